"""Parity of fxport's eager Gemma 4 audio tower with transformers 5.23's ``Gemma4AudioModel``.

Tiny random configs drawn by hypothesis (chunk / left / right context, heads, layers, conv
kernel, subsampling channels, clipped linears, activation), batch 1-2, T frames with padding
anywhere in the mask. HF weights (norms and clip bounds moved away from their init) load into
ours with a strict ``load_state_dict``.

Tolerance: fp32 features, max |ours - HF| / max |HF| <= 1e-4 over every position (padded ones
included: both compute them the same way); masks and soft-token counts exactly equal.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig as HFAudioConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel as HFAudioModel
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from fxport.models.gemma4.audio import (
    Gemma4AudioConfig,
    Gemma4AudioModel,
    audio_output_length,
    from_hf_config,
    num_audio_tokens,
)

RTOL = 1e-4  # fp32, relative max


def hf_audio_config(**kw) -> HFAudioConfig:
    cfg = HFAudioConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight away from its init; finite clip bounds that bite (about 1.5 sigma)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * r if p.dim() == 1 else 0.3 * r)
        for n, b in model.named_buffers():
            if n.endswith(("input_min", "output_min")):
                b.fill_(-1.5 - torch.rand((), generator=g).item())
            elif n.endswith(("input_max", "output_max")):
                b.fill_(1.5 + torch.rand((), generator=g).item())


def hf_token_count(mask: np.ndarray) -> int:
    """Audio placeholders the HF processor writes for one clip's frame mask."""
    proc = types.SimpleNamespace(boa_token="<boa>", audio_token="@", eoa_token="<eoa>")
    text = Gemma4Processor.replace_audio_token(proc, {"input_features_mask": [mask]}, 0)
    return text.count("@")


@st.composite
def audio_case(draw):
    heads = draw(st.integers(1, 2))
    c0 = draw(st.sampled_from([4, 8, 12]))
    cfg = dict(
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        hidden_act=draw(st.sampled_from(["silu", "gelu_pytorch_tanh"])),
        subsampling_conv_channels=[c0, draw(st.sampled_from([2, 4]))],
        conv_kernel_size=draw(st.integers(2, 5)),
        residual_weight=draw(st.sampled_from([0.5, 1.0])),
        attention_chunk_size=draw(st.integers(1, 5)),
        attention_context_left=draw(st.integers(1, 6)),
        attention_context_right=draw(st.integers(0, 3)),
        attention_logit_cap=draw(st.sampled_from([50.0, 2.0])),
        use_clipped_linears=draw(st.booleans()),
        output_proj_dims=draw(st.sampled_from([8, 12])),
    )
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 40))
    n_mels = draw(st.integers(c0 // 4 * 4 - 3, c0 // 4 * 4))  # every width with ceil(M / 4) == c0 // 4
    lengths = [draw(st.integers(1, T)) for _ in range(B)]
    holes = draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, T - 1)), max_size=3))
    return cfg, B, T, n_mels, lengths, holes, draw(st.integers(0, 2**16))


@given(audio_case())
@settings(max_examples=25, deadline=None)
def test_audio_tower_matches_transformers(case):
    cfg_kw, B, T, n_mels, lengths, holes, seed = case
    hf_cfg = hf_audio_config(**cfg_kw)
    torch.manual_seed(seed)
    hf = HFAudioModel(hf_cfg).eval()
    randomize(hf, seed)
    ours = Gemma4AudioModel(from_hf_config(hf_cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, n_mels, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # right padding, as the extractor
    for b, t in holes:  # and frames masked anywhere
        mask[b, t] = False
    with torch.no_grad():
        ref = hf(feats, mask)
        got, got_mask = ours(feats, mask)
    ref_h = ref.last_hidden_state
    assert got.shape == ref_h.shape == (B, audio_output_length(T), cfg_kw["output_proj_dims"])
    assert torch.equal(got_mask, ref.attention_mask)
    rel = ((got - ref_h).abs().max() / ref_h.abs().max().clamp_min(1e-30)).item()
    assert rel <= RTOL, f"relative max diff {rel:.2e}"
    counts = num_audio_tokens(mask)
    assert counts.tolist() == [hf_token_count(mask[b].numpy()) for b in range(B)]
    assert counts.tolist() == ref.attention_mask.sum(-1).tolist()


def test_hf_state_dict_names_and_shapes_at_full_size():
    """transformers' default (E2B-sized) audio tower and ours have identical state_dict names and shapes."""
    hf_cfg = hf_audio_config()
    with torch.device("meta"):
        hf = HFAudioModel(hf_cfg)
        ours = Gemma4AudioModel(from_hf_config(hf_cfg))
    ref = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == ref
    assert from_hf_config(hf_cfg) == Gemma4AudioConfig()  # same defaults as transformers


def test_from_hf_config_rejects_a_config_without_audio():
    from transformers import Gemma4TextConfig

    with pytest.raises(ValueError, match="expected a gemma4_audio config"):
        from_hf_config(Gemma4TextConfig())


def test_wrong_mel_width_is_a_clear_error():
    tower = Gemma4AudioModel(Gemma4AudioConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                               subsampling_conv_channels=(8, 2), output_proj_dims=8))
    with pytest.raises(ValueError, match="has 12 mel bins but the input projection expects 8"):
        tower(torch.zeros(1, 8, 12), torch.ones(1, 8, dtype=torch.bool))


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 127, 128, 129, 3000])
def test_output_length_matches_hf_processor_arithmetic(frames):
    assert audio_output_length(frames) == hf_token_count(np.ones(frames, dtype=bool))


def test_real_geometry_small_width():
    """The checkpoint's attention geometry (chunk 12, left 13, right 0), subsampling channels
    (128, 32) and 128 mel bins, at hidden 16: 130 frames -> 33 tokens in 3 blocks, right padding."""
    hf_cfg = hf_audio_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=24)
    torch.manual_seed(0)
    hf = HFAudioModel(hf_cfg).eval()
    randomize(hf, 0)
    ours = Gemma4AudioModel(from_hf_config(hf_cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    feats = torch.randn(2, 130, 128, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(130)[None] < torch.tensor([[130], [71]])
    with torch.no_grad():
        ref = hf(feats, mask)
        got, got_mask = ours(feats, mask)
    assert got.shape == (2, 33, 24) and torch.equal(got_mask, ref.attention_mask)
    assert num_audio_tokens(mask).tolist() == [33, 18]
    rel = ((got - ref.last_hidden_state).abs().max() / ref.last_hidden_state.abs().max()).item()
    assert rel <= RTOL, f"relative max diff {rel:.2e}"
