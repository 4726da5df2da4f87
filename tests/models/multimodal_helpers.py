"""Tiny random Gemma 4 multimodal models and hand-built inputs (no processor can be downloaded).

Shared by tests/models/test_multimodal*.py and tests/runtime/test_image*.py.

Audio: a test that wants audio passes ``audio=audio_hf_config(...)`` to :func:`hf_multimodal_config`
and builds its inputs with :func:`audio_inputs` and :func:`prompt_with_audio`.
"""

from __future__ import annotations

import torch
from transformers import Gemma4Config as HFGemma4Config
from transformers import Gemma4TextConfig, Gemma4VisionConfig

from fxport.models.gemma4.multimodal import (
    Gemma4ForConditionalGeneration,
    image_placeholders,
    multimodal_from_hf_config,
)

VOCAB = 96
IMG, AUD, VID, BOI, EOI, BOA, EOA = 95, 94, 93, 92, 91, 90, 89
TEXT_MAX = 88  # text token ids are drawn from [3, TEXT_MAX]
S, F = "sliding_attention", "full_attention"


def hf_text_config(layer_types=(S, F), ple: int = 4, window: int = 3, bidir: str | None = None,
                   hidden: int = 32) -> Gemma4TextConfig:
    cfg = Gemma4TextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=hidden, intermediate_size=48,
        num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        global_head_dim=16, layer_types=list(layer_types), sliding_window=window,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=ple,
        use_bidirectional_attention=bidir, max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return cfg


def hf_vision_config(hidden: int = 16, layers: int = 1, heads: int = 2, kv_heads: int = 2,
                     pooling: int = 2, patch: int = 2, clipped: bool = False,
                     standardize: bool = False) -> Gemma4VisionConfig:
    cfg = Gemma4VisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
        pooling_kernel_size=pooling, patch_size=patch, position_embedding_size=16,
        use_clipped_linears=clipped, standardize=standardize,
    )
    cfg._attn_implementation = "eager"
    return cfg


def audio_hf_config(hidden: int = 16, layers: int = 1, heads: int = 2, chunk: int = 3, left: int = 4,
                    right: int = 1, clipped: bool = True, out: int = 24):
    """A tiny transformers Gemma4AudioConfig (8 mel bins: subsampling channels (8, 4))."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig

    cfg = Gemma4AudioConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        subsampling_conv_channels=[8, 4], conv_kernel_size=3, attention_chunk_size=chunk,
        attention_context_left=left, attention_context_right=right, use_clipped_linears=clipped,
        output_proj_dims=out,
    )
    cfg._attn_implementation = "eager"
    return cfg


def audio_inputs(hf_cfg, g: torch.Generator, frames: int = 21, valid: int | None = None):
    """(input_features (1, frames, 8), input_features_mask (1, frames), n_tokens) for one clip,
    right-padded after ``valid`` frames as the feature extractor pads (features zero there)."""
    from fxport.models.gemma4.audio import num_audio_tokens

    n_mels = hf_cfg.subsampling_conv_channels[0] // 4 * 4
    valid = frames if valid is None else valid
    mask = (torch.arange(frames) < valid)[None]
    feats = torch.randn(1, frames, n_mels, generator=g) * mask[..., None]
    return feats, mask, int(num_audio_tokens(mask)[0])


def prompt_with_audio(config, n: int, g: torch.Generator) -> torch.Tensor:
    """(1, L): BOS, text, ``boa + audio * n + eoa``, text."""
    from fxport.models.gemma4.multimodal import audio_placeholders

    ids = [2] + torch.randint(3, TEXT_MAX + 1, (2,), generator=g).tolist() + audio_placeholders(config, n)
    return torch.tensor([ids + torch.randint(3, TEXT_MAX + 1, (2,), generator=g).tolist()])


def hf_multimodal_config(text: Gemma4TextConfig, vision: Gemma4VisionConfig | None,
                         audio=None) -> HFGemma4Config:
    cfg = HFGemma4Config(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMG,
        audio_token_id=AUD, video_token_id=VID, boi_token_id=BOI, eoi_token_id=EOI,
        boa_token_id=BOA, eoa_token_index=EOA,
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every weight away from its init (norm weights and scales away from 1 / 0), set
    finite clip bounds and standardization buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * r if p.dim() == 1 else 0.1 * r)
        for n, b in model.named_buffers():
            leaf = n.rsplit(".", 1)[-1]
            if leaf == "layer_scalar":
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif leaf in ("input_min", "output_min"):
                b.fill_(-0.5 - float(torch.rand((), generator=g)))
            elif leaf in ("input_max", "output_max"):
                b.fill_(0.5 + float(torch.rand((), generator=g)))
            elif leaf == "std_bias":
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif leaf == "std_scale":
                b.copy_(1.0 + 0.3 * torch.randn(b.shape, generator=g))


def pair(hf_cfg: HFGemma4Config, seed: int, max_seq_len: int = 64):
    """(transformers Gemma4ForConditionalGeneration, ours) with the same random weights."""
    from transformers import Gemma4ForConditionalGeneration as HFGen

    torch.manual_seed(seed)
    hf = HFGen(hf_cfg).eval()
    randomize(hf, seed)
    ours = Gemma4ForConditionalGeneration(multimodal_from_hf_config(hf_cfg), max_seq_len=max_seq_len).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def image_inputs(grids: list[tuple[int, int]], patch: int, max_patches: int, g: torch.Generator):
    """pixel_values (N, max_patches, 3 p^2) in [0, 1] and position ids (N, max_patches, 2) as
    (column, row), (-1, -1) on padding, for images of ``grids`` = [(rows, cols) in patches]."""
    pv = torch.zeros(len(grids), max_patches, 3 * patch * patch)
    pos = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        pv[i, :n] = torch.rand(n, 3 * patch * patch, generator=g)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos[i, :n] = torch.stack([c.reshape(-1), r.reshape(-1)], dim=-1)
    return pv, pos


def prompt_with_images(config, soft_tokens: list[int], g: torch.Generator, text_between: int = 2) -> torch.Tensor:
    """(1, L): BOS, text, and ``boi + image * n + eoi`` per image with text in between."""
    def text(n: int) -> list[int]:
        return torch.randint(3, TEXT_MAX + 1, (n,), generator=g).tolist()

    ids = [2] + text(2)
    for n in soft_tokens:
        ids += image_placeholders(config, n) + text(text_between)
    return torch.tensor([ids])


def mm_token_type_ids(tokens: torch.Tensor) -> torch.Tensor:
    """What the HF processor returns: 1 on image tokens, 2 on video, 3 on audio, 0 elsewhere."""
    out = torch.zeros_like(tokens)
    out[tokens == IMG] = 1
    out[tokens == VID] = 2
    out[tokens == AUD] = 3
    return out


def rel_max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
