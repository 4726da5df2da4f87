"""Gemma 4 audio vs transformers on tiny random configs: the tower alone, then audio + text.

Rows: (1) fxport's ``Gemma4AudioModel`` vs transformers' ``Gemma4AudioModel``, fp32, relative
max error (max |ours - hf| / max |hf|) over N random configs (chunk / left / right context,
heads, layers, conv kernel, subsampling channels, clipping) with batch 2 (one clip right-padded);
(2) the multimodal model with one audio clip in the prompt vs ``Gemma4ForConditionalGeneration``
(prefill logits, then one decode step), over 3 seeds. Never part of `make test`.

    .venv/bin/python bench/audio_parity.py [N]
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models.multimodal_helpers import (  # noqa: E402
    TEXT_MAX, audio_hf_config, audio_inputs, hf_multimodal_config, hf_text_config, mm_token_type_ids, pair,
    prompt_with_audio, rel_max_err,
)
from models.test_audio_parity import hf_audio_config, randomize  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel as HFAudioModel  # noqa: E402

from fxport.models.gemma4.audio import Gemma4AudioModel, from_hf_config  # noqa: E402


def tower_error(seed: int) -> float:
    rng = random.Random(seed)
    heads, c0 = rng.randint(1, 2), rng.choice([4, 8, 12])
    cfg = hf_audio_config(
        hidden_size=heads * rng.choice([4, 8]), num_hidden_layers=rng.randint(1, 2), num_attention_heads=heads,
        subsampling_conv_channels=[c0, rng.choice([2, 4])], conv_kernel_size=rng.randint(2, 5),
        attention_chunk_size=rng.randint(1, 5), attention_context_left=rng.randint(1, 6),
        attention_context_right=rng.randint(0, 3), use_clipped_linears=rng.random() < 0.5, output_proj_dims=8,
    )
    torch.manual_seed(seed)
    hf = HFAudioModel(cfg).eval()
    randomize(hf, seed)
    ours = Gemma4AudioModel(from_hf_config(cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    T = rng.randint(1, 40)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, c0 // 4 * 4, generator=g)
    mask = torch.arange(T)[None] < torch.tensor([[T], [rng.randint(1, T)]])
    with torch.no_grad():
        return rel_max_err(ours(x, mask)[0], hf(x, mask).last_hidden_state)


def multimodal_errors(seed: int) -> tuple[float, float]:
    hf, ours = pair(hf_multimodal_config(hf_text_config(), None, audio=audio_hf_config()), seed)
    g = torch.Generator().manual_seed(seed)
    feats, fmask, n = audio_inputs(hf.config.audio_config, g, frames=29, valid=23)
    tokens = prompt_with_audio(ours.config, n, g)
    L = tokens.shape[1]
    with torch.no_grad():
        out = hf(input_ids=tokens, mm_token_type_ids=mm_token_type_ids(tokens), input_features=feats,
                 input_features_mask=fmask, use_cache=True)
        e1 = rel_max_err(ours.generate_step(tokens, torch.arange(L), None, None, feats, fmask), out.logits)
        nxt = torch.tensor([[int(out.logits[0, -1].argmax()) % (TEXT_MAX + 1)]])
        ref = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits
        e2 = rel_max_err(ours(nxt, torch.tensor([L])), ref)
    return e1, e2


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    tower = [tower_error(s) for s in range(n)]
    mm = [multimodal_errors(s) for s in range(3)]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (errors do not depend on load)")
    print("| check | relative max error (fp32) |")
    print("|---|---|")
    print(f"| audio tower vs transformers, {n} random tiny configs, batch 2 | max {max(tower):.1e}, "
          f"median {sorted(tower)[n // 2]:.1e} |")
    print(f"| audio + text prompt, 3 seeds: prefill / decode step | {max(e for e, _ in mm):.1e} / "
          f"{max(e for _, e in mm):.1e} |")


if __name__ == "__main__":
    main()
