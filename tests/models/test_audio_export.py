"""The ``audio_encoder`` method: torch.export at a fixed frame count (the .pte is checked in
tests/models/test_audio_pte.py, lowered inside a text + audio program).

One tiny tower (random weights, finite clip bounds) is exported once per module at T = 23
frames (T' = 6 tokens: attention blocks of 4, the second one partial). Reference: the eager
tower. Tolerances: ExportedProgram == eager to 1e-6 relative max (the same ATen ops); masks
exactly equal. Several masks run through the one program, so the mask is an input of the
graph, not a constant baked into it.
"""

from __future__ import annotations

import pytest
import torch

from fxport.models.gemma4.audio import (
    AudioEncoder,
    Gemma4AudioConfig,
    Gemma4AudioModel,
    audio_encoder_method,
    audio_output_length,
)

T = 23
CFG = Gemma4AudioConfig(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=(8, 4),
    conv_kernel_size=3, attention_chunk_size=4, attention_context_left=3, attention_context_right=1,
    output_proj_dims=12,
)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_tower(seed: int = 0) -> Gemma4AudioModel:
    torch.manual_seed(seed)
    tower = Gemma4AudioModel(CFG).eval()
    with torch.no_grad():
        for n, p in tower.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
        for n, b in tower.named_buffers():
            if n.endswith("_min"):
                b.fill_(-2.0)
            elif n.endswith("_max"):
                b.fill_(2.0)
    return tower


def masks() -> list[torch.Tensor]:
    full = torch.ones(1, T, dtype=torch.bool)
    short = full.clone()
    short[:, 9:] = False  # right padding, as the feature extractor pads
    holes = full.clone()
    holes[:, [0, 4, 5, 17]] = False
    return [full, short, holes]


@pytest.fixture(scope="module")
def exported():
    tower = tiny_tower()
    embedder = torch.nn.Linear(CFG.output_proj_dims, 20, bias=False)  # stands in for embed_audio
    with torch.no_grad():
        ep = audio_encoder_method(tower, T, embedder=embedder)
    return AudioEncoder(tower, embedder).eval(), ep


def test_graph_has_no_data_dependent_ops(exported):
    _, ep = exported
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    bad = {t for t in targets if any(s in t for s in ("nonzero", "item", "_assert_scalar", "masked_select",
                                                       "local_scalar_dense", "index_put"))}
    assert bad == set()
    sig = ep.graph_signature
    assert [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"] == ["input_features",
                                                                                    "input_features_mask"]
    assert sig.buffers_to_mutate == {}


def test_exported_program_matches_eager(exported):
    eager, ep = exported
    g = torch.Generator().manual_seed(1)
    for mask in masks():
        x = torch.randn(1, T, CFG.n_mels, generator=g)
        with torch.no_grad():
            ref, ref_mask = eager(x, mask)
            got, got_mask = ep.module()(x, mask)
        assert got.shape == (1, audio_output_length(T), 20)
        assert torch.equal(got_mask, ref_mask)
        assert rel_max(got, ref) <= 1e-6


def test_bad_max_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="max_frames=0 must be >= 1"):
        audio_encoder_method(tiny_tower(), 0)
