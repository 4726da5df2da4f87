"""A text + audio Gemma 4 as one XNNPACK ``.pte`` (audio_encoder, prefill, decode) vs eager.

Tiny model (text: 1 full-attention layer, hidden 32, PLE — sliding layers and their ring
buffers are covered by test_multimodal_export.py and cost a third more lowering time; audio:
1 conformer layer, hidden 16, chunk 3, left 4, right 1, 8 mel bins) exported with ``export_methods(multimodal=True,
max_audio_frames=24)``, the multimodal CPU passes (FixedSlotFusion on prefill, RMSNorm as a
linear on the audio encoder) and lowered once per module. Tolerances (fp32): audio features
and logits relative max <= 1e-4; generated greedy tokens equal; masks exactly equal.
"""

from __future__ import annotations

import types

import pytest
import torch

from fxport.tests.lowering.helpers import lower_fast
from fxport.builder.multimodal import rewrite_multimodal_programs
from fxport.models.gemma4.export import export_methods, multimodal_metadata
from fxport.runtime.generate import generate
from fxport.runtime.multimodal import open_pte

from fxport.tests.models.multimodal_helpers import F, audio_hf_config, hf_multimodal_config, hf_text_config, pair, rel_max_err

RTOL = 1e-4
CHUNK, SEQ, FRAMES = 16, 32, 24
FORBIDDEN = ("nonzero", "item", "_assert_scalar", "masked_scatter", "_local_scalar_dense")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    hf_cfg = hf_multimodal_config(hf_text_config(layer_types=(F,), ple=4, window=3), None, audio=audio_hf_config())
    _, model = pair(hf_cfg, seed=9, max_seq_len=SEQ)
    with torch.no_grad():
        raw = export_methods(model, max_prefill_chunk=CHUNK, multimodal=True, max_audio_frames=FRAMES)
        programs, _ = rewrite_multimodal_programs(model, raw, CHUNK)
        lowered = lower_fast(programs, constant_methods=multimodal_metadata(model, CHUNK, 4, FRAMES))
    path = lowered.save(tmp_path_factory.mktemp("audio") / "tiny-audio.pte")
    return dict(model=model, programs=programs, lowered=lowered, path=path)


def _clip(seed: int, valid: int):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(FRAMES) < valid)[None]
    return torch.randn(1, FRAMES, 8, generator=g) * mask[..., None], mask


def test_program_methods_and_delegation(built):
    assert sorted(built["programs"]) == ["audio_encoder", "decode", "prefill"]
    for method, ep in built["programs"].items():
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not [o for o in ops if any(f in o for f in FORBIDDEN)], method
    assert not built["programs"]["audio_encoder"].graph_signature.buffers_to_mutate
    report = built["lowered"].report["audio_encoder"]
    # every matmul, convolution, softmax and windowing op of the tower runs in XNNPACK; what stays
    # in portable kernels is mask arithmetic, the subsampling LayerNorms and softplus(per_dim_scale)
    heavy = {"aten.bmm", "aten.mm", "aten.addmm", "aten.convolution", "aten._softmax", "aten.unfold_copy",
             "aten.expand_copy", "aten.tanh", "aten.mean.dim", "aten.linear"}
    assert not heavy & {op.split(".default")[0] for op in report.undelegated_ops}, report.summary()


@pytest.mark.parametrize("valid", [FRAMES, 13, 1])
def test_audio_encoder_matches_eager(built, valid):
    pte = open_pte(built["path"])
    assert pte.has_audio and not pte.has_images and pte.multimodal["max_audio_frames"] == FRAMES
    feats, mask = _clip(valid, valid)
    with torch.no_grad():
        ref, ref_mask = built["model"].encode_audio(feats, mask)
    got, got_mask = pte.encode_audio(feats, mask)
    assert torch.equal(got_mask, ref_mask)
    assert rel_max_err(got, ref) <= RTOL


def test_generate_with_audio_pte_matches_eager(built):
    """generate(.pte, audio=) and generate(eager, audio=): same prompt layout, same greedy
    tokens, first-token logits within 1e-4."""
    feats, mask = _clip(1, 19)
    # ids in, no text out: only bos_id matters (the clip goes right after BOS)
    tok = types.SimpleNamespace(bos_id=2, eos_ids=(), vocab_size=None, decode=lambda ids, skip_special_tokens=True: "")
    runs = {}
    for name, program in (("eager", built["model"]), ("pte", str(built["path"]))):
        logits = []
        res = generate(program, tok, [2, 5, 17], max_new_tokens=4, audio=(feats, mask),
                       sampler=lambda x: (logits.append(x), x.argmax(-1))[1])
        runs[name] = (res, logits[0])
    (e, e_logits), (p, p_logits) = runs["eager"], runs["pte"]
    assert p.prompt_tokens == e.prompt_tokens == [2, 90] + [94] * 5 + [89, 5, 17]  # 19 frames -> 5 tokens
    assert p.tokens == e.tokens
    assert rel_max_err(p_logits, e_logits) <= RTOL
