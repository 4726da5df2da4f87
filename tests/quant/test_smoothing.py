"""Activation smoothing (fxport.quant.smoothing): exact in float, folded where the contract
says, skipped where it would be wrong, and it lowers the int8 dynamic-activation error.

Tolerances: the smoothed float model equals the original to rel 1e-5 (fp32 rounding of the
rescaled weights); the quantization-error test asserts a strict decrease on a model with an
outlier input channel, the case smoothing exists for.
"""

from __future__ import annotations

import pytest
import torch

from fxport.models.gemma4.config import FULL, SLIDING, get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.quant.smoothing import (
    calibration_text,
    calibration_windows,
    input_absmax,
    smooth_activations,
)

MAX_SEQ_LEN = 32


class ByteTokenizer:
    """Token ids from the UTF-8 bytes of the text, folded into a tiny vocabulary (BOS = 2)."""

    bos_id = 2

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [3 + b % (self.vocab - 3) for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids


def _model(preset: str, seed: int = 0, **kw) -> Gemma4ForCausalLM:
    cfg = get_preset(preset).replace(**kw)
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg, max_seq_len=MAX_SEQ_LEN).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    return model


def _gemma3(**kw):  # GQA 4 query heads on 1 KV head, (1 + w) norms, tied head
    return _model("tiny-gemma3", num_hidden_layers=2, layer_types=[SLIDING, FULL], **kw)


def _windows(model, n=60):
    return calibration_windows(ByteTokenizer(model.config.vocab_size), n_tokens=n, window=MAX_SEQ_LEN)


def _logits(model, tokens):
    model.reset_caches()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), torch.arange(len(tokens)))[0]
    model.reset_caches()
    return out


def test_calibration_windows_cut_the_python_docs():
    text, source = calibration_text()
    assert "pydoc_data" in source and len(text) > 100_000
    ws = calibration_windows(ByteTokenizer(256), n_tokens=70, window=32)
    assert [len(w) for w in ws] == [32, 32, 9]  # 31 + 31 + 8 text tokens, each after BOS
    assert all(w[0] == 2 for w in ws)


def test_smoothed_float_model_equals_the_original():
    import copy

    model = _gemma3()
    ref = copy.deepcopy(model)
    emb_before = model.model.embed_tokens.weight.detach().clone()
    report = smooth_activations(model, input_absmax(model, _windows(model)), alpha=0.5)
    p = "model.layers"
    assert report.smoothed == {
        **{k: v for i in range(2) for k, v in {
            f"{p}.{i}.input_layernorm": [f"{p}.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
            f"{p}.{i}.self_attn.v_proj": [f"{p}.{i}.self_attn.o_proj"],
            f"{p}.{i}.pre_feedforward_layernorm": [f"{p}.{i}.mlp.gate_proj", f"{p}.{i}.mlp.up_proj"],
            f"{p}.{i}.mlp.up_proj": [f"{p}.{i}.mlp.down_proj"],
        }.items()},
        "model.norm": ["lm_head"],
    }
    assert report.skipped == {}
    # the head was untied: the lookup keeps the original table, the head holds a scaled copy
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb_before)
    assert not torch.equal(model.lm_head.weight, emb_before)
    tokens = list(range(5, 5 + 24))
    want, got = _logits(ref, tokens), _logits(model, tokens)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    # caches were reset after calibration: nothing left in them
    assert all(float(b.abs().max()) == 0 for n, b in model.named_buffers() if "cache" in n)


def test_gemma4_layouts_skip_what_would_be_wrong():
    """k_eq_v (no v_proj), v_norm and KV-shared layers: V is not rescaled; the rest is exact."""
    import copy

    model = _model("tiny", max_position_embeddings=512)
    ref = copy.deepcopy(model)
    report = smooth_activations(model, input_absmax(model, _windows(model)), alpha=0.5)
    n = model.config.num_hidden_layers
    assert set(report.skipped) == {f"model.layers.{i}.self_attn.v_proj" for i in range(n)}
    assert set(report.skipped.values()) == {"the model shares KV caches across layers"}
    for i in range(n):
        assert f"model.layers.{i}.mlp.up_proj" in report.smoothed
    tokens = list(range(5, 5 + 24))
    want, got = _logits(ref, tokens), _logits(model, tokens)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5

    nk = _model("tiny", num_kv_shared_layers=0, hidden_size_per_layer_input=0)
    rep = smooth_activations(nk, input_absmax(nk, _windows(nk)), alpha=0.5)
    reasons = {k: v for k, v in rep.skipped.items() if k.endswith("v_proj")}
    assert len(reasons) == nk.config.num_hidden_layers
    assert set(reasons.values()) <= {"no separate v_proj/o_proj",
                                     "V is normalized after v_proj (a row scale would be undone)"}


def test_smoothing_lowers_int8_activation_error():
    """An outlier channel in each norm scale (x40): per-token int8 activations lose the other
    channels; after smoothing the int8 model is closer to the float one (measured: mean |error|
    of the logits 0.40 -> 0.19)."""
    import copy

    from fxport.lowering.xnnpack_quant import quantize_for_xnnpack

    base = _gemma3()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.pre_feedforward_layernorm.weight[3] = 40.0
            layer.input_layernorm.weight[7] = 40.0
        base.model.norm.weight[5] = 40.0
    tokens = list(range(40, 40 + 24))
    want = _logits(base, tokens)

    def err(smooth: bool) -> float:
        m = copy.deepcopy(base)
        if smooth:
            smooth_activations(m, input_absmax(m, _windows(m)), alpha=0.5)
        quantize_for_xnnpack(m, "8da8w")
        return float((_logits(m, tokens) - want).abs().mean())

    plain, smoothed = err(False), err(True)
    assert smoothed < 0.6 * plain, (plain, smoothed)


def test_balanced_recipe_smooths_with_a_tokenizer_and_says_when_it_cannot():
    from fxport.lowering.xnnpack_quant import quantize_for_xnnpack

    m = _gemma3()
    rep = quantize_for_xnnpack(m, "balanced", tokenizer=ByteTokenizer(m.config.vocab_size))
    assert rep.smoothing.startswith("activation smoothing alpha 0.5: 15 linear(s) at 9 site(s), calibrated on pydoc_data")
    # the lookup reads the smoothed head's codes and divides by the head's scale: the table it
    # returns is the float table up to int8 rounding of the scaled rows
    emb = m.model.embed_tokens
    assert emb.codes.data_ptr() == m.lm_head.weight.qdata.data_ptr()
    assert rep.embedding.startswith("model.embed_tokens int8 per-row, lm_head's codes, divided by its smoothing scale")
    s = 1.0 / emb.column_scale
    step = (m.lm_head.weight.scale.reshape(-1, 1) / s).float()  # half a step of each looked-up element
    table = _gemma3().model.embed_tokens.weight.detach()
    assert bool(((emb.dequantized() - table).abs() <= 0.5 * step + 1e-6).all())
    assert rep.calibration.startswith("1022 tokens of pydoc_data.topics")  # after BOS in each window
    m2 = _gemma3()
    rep2 = quantize_for_xnnpack(m2, "balanced")
    assert rep2.smoothing is None
    assert rep2.calibration == "skipped: no tokenizer to encode the calibration text (no smoothing, no outlier split, no GPTQ)"
    assert rep2.summary().endswith("; calibration skipped: no tokenizer to encode the calibration text (no smoothing, no outlier split, no GPTQ)")
    assert quantize_for_xnnpack(_gemma3(), "8da8w").smoothing is None


def test_bad_alpha_is_refused():
    m = _gemma3()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        smooth_activations(m, {}, alpha=1.5)
