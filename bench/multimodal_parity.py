"""Eager multimodal Gemma 4 vs transformers' Gemma4ForConditionalGeneration on tiny random configs.

Prints one row per (pooling k, attention setting): the largest relative max error of the fp32
logits (max |ours - hf| / max |hf|) over 3 seeds, for a prefill holding 3 images of different
sizes with padded patches and for one decode step after it. Never part of `make test`.

    .venv/bin/python bench/multimodal_parity.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models.multimodal_helpers import (  # noqa: E402
    F, S, TEXT_MAX, hf_multimodal_config, hf_text_config, hf_vision_config, image_inputs,
    mm_token_type_ids, pair, prompt_with_images, rel_max_err,
)


def errors(k: int, bidir: str | None, seed: int) -> tuple[float, float]:
    vis = hf_vision_config(layers=2, kv_heads=1, pooling=k, clipped=bool(seed % 2), standardize=bool(seed % 2))
    hf, ours = pair(hf_multimodal_config(hf_text_config(layer_types=(S, S, F), window=4, bidir=bidir), vis), seed)
    g = torch.Generator().manual_seed(seed)
    pv, pos = image_inputs([(k, 2 * k), (2 * k, k), (k, k)], patch=2, max_patches=6 * k * k, g=g)
    tokens = prompt_with_images(ours.config, [2, 2, 1], g)
    L = tokens.shape[1]
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=pv, image_position_ids=pos, use_cache=True,
                 mm_token_type_ids=mm_token_type_ids(tokens))
        e1 = rel_max_err(ours.generate_step(tokens, torch.arange(L), pv, pos), out.logits)
        nxt = torch.tensor([[int(out.logits[0, -1].argmax()) % (TEXT_MAX + 1)]])
        ref = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits
        e2 = rel_max_err(ours(nxt, torch.tensor([L])), ref)
    return e1, e2


def main() -> None:
    print(f"{'pooling k':>9} {'attention':>14} {'prefill rel. max':>17} {'decode rel. max':>16}")
    for bidir in (None, "vision"):
        for k in (2, 3):
            errs = [errors(k, bidir, seed) for seed in range(3)]
            print(f"{k:>9} {str(bidir or 'causal'):>14} {max(e[0] for e in errs):>17.2e} {max(e[1] for e in errs):>16.2e}")
    print("load average:", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
