"""Quality report metrics (PEIR, mean |diff|) and the report on a tiny Gemma config."""

import copy
import dataclasses

import pytest
import torch

from fxport.quant import DEFAULT_RECIPE, dequantize_into, mean_abs_diff, peir, quality_report, quantize_model


def test_metric_definitions():
    ref = torch.tensor([0.0, 2.0, -2.0, 1.0])
    out = torch.tensor([0.5, 2.0, -2.0, 0.0])
    assert mean_abs_diff(ref, out) == pytest.approx(1.5 / 4)
    assert peir(ref, out) == pytest.approx(1.0 / 4.0)  # peak error 1 over interval 4
    assert peir(torch.ones(3), torch.ones(3)) == 0.0


@pytest.fixture(scope="module")
def tiny_models():
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    cfg = dataclasses.replace(get_preset("tiny-gemma3"), num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    ref = Gemma4ForCausalLM(cfg, max_seq_len=32, max_batch_size=1).eval()
    q = copy.deepcopy(ref)
    qws = quantize_model(q, DEFAULT_RECIPE)
    dequantize_into(q, qws)
    return ref, q, qws


def test_identical_models_report_zero(tiny_models):
    ref, _, _ = tiny_models
    rep = quality_report(ref, copy.deepcopy(ref), torch.tensor([[1, 5, 9, 2]]), gen_tokens=4)
    assert [s.name for s in rep.layers] == ["model.layers.0", "model.layers.1"]
    assert all(s.mean_abs_diff == 0.0 and s.peir == 0.0 for s in rep.layers + [rep.logits])
    assert (rep.token_agreement, rep.positions, rep.free_run_common_prefix) == (1.0, 7, 4)


def test_quantized_report_matches_direct_computation(tiny_models):
    ref, q, qws = tiny_models
    assert len(qws) == 2 * 7 + 1  # 7 linears per layer + the (tied) embedding
    prompt = torch.tensor([[3, 7, 11, 13, 17]])
    rep = quality_report(ref, q, prompt, gen_tokens=3)
    with torch.no_grad():
        from fxport.quant.report import greedy

        seq = torch.cat([prompt, greedy(ref, prompt, 3)[:, :-1]], dim=1)
        lr = ref(seq, torch.arange(seq.shape[1]))
        lq = q(seq, torch.arange(seq.shape[1]))
    assert rep.logits.mean_abs_diff == pytest.approx(float((lq - lr).abs().mean()), rel=1e-6)
    assert rep.logits.peir == pytest.approx(float((lq - lr).abs().max() / (lr.max() - lr.min())), rel=1e-6)
    assert rep.logits.mean_abs_diff > 0
    assert rep.token_agreement == pytest.approx(float((lq.argmax(-1) == lr.argmax(-1)).float().mean()))
    text = str(rep)
    assert "│ logits" in text and "PEIR" in text and "greedy agreement" in text
