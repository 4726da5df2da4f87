"""GPTQ rounding (fxport.quant.gptq): RTN when inputs are uncorrelated, a lower output error
than RTN when they are correlated, codes on the given grid, and the torchao tensor rewritten in
place so the XNNPACK form is unchanged."""

from __future__ import annotations

import torch
from torch import nn

from fxport.quant.gptq import apply_gptq, gptq_round, input_hessians

G = 32


def _grid(w: torch.Tensor):
    """Symmetric int4 g32 min-max grid: scale = max|w| / 7.5 per group, zero 0."""
    scale = w.abs().reshape(w.shape[0], -1, G).amax(-1) / 7.5
    return scale, torch.zeros_like(scale)


def _rtn(w, scale):
    return torch.clamp(torch.round(w / scale.repeat_interleave(G, 1)), -8, 7)


def _output_error(x, w, q, scale):
    wq = q.float() * scale.repeat_interleave(G, 1)
    return float(((x @ (w - wq).T) ** 2).mean())


def test_uncorrelated_inputs_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    scale, zero = _grid(w)
    q = gptq_round(w, torch.eye(64), scale, zero, G, -8, 7)
    assert torch.equal(q.float(), _rtn(w, scale))


def test_correlated_inputs_lower_the_output_error():
    torch.manual_seed(0)
    x = torch.randn(2048, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(2048, 64)  # rank-16 + noise
    w = torch.randn(32, 64)
    scale, zero = _grid(w)
    q = gptq_round(w, x.T @ x / x.shape[0], scale, zero, G, -8, 7)
    assert int(q.min()) >= -8 and int(q.max()) <= 7 and q.dtype == torch.int8
    rtn, gptq = _output_error(x, w, _rtn(w, scale), scale), _output_error(x, w, q, scale)
    assert gptq < 0.5 * rtn, (rtn, gptq)


def test_apply_gptq_rewrites_the_torchao_codes_in_place():
    from torchao.quantization import quantize_

    from fxport.lowering.xnnpack_quant import INT4_G32

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 32, bias=False)
            self.b = nn.Linear(64, 8, bias=False)

        def forward(self, tokens, input_pos):  # tokens (1, L) -> correlated (1, L, 64) inputs
            x = torch.sin(tokens[..., None].float() * torch.linspace(0.1, 3.0, 64))
            return self.a(x) + self.b(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    m = Two()
    hs = input_hessians(m, [list(range(200))], {"a", "b"})
    assert hs["b"] is hs["a"]  # one input, one matrix
    w0 = {"a": m.a.weight.detach().clone()}
    quantize_(m, INT4_G32.torchao_config())
    before = m.a.weight.qdata.clone()
    scale = m.a.weight.scale.clone()
    assert apply_gptq(m, hs, w0) == ["a"]
    assert type(m.a.weight).__name__ == "IntxUnpackedToInt8Tensor" and torch.equal(m.a.weight.scale, scale)
    assert not torch.equal(m.a.weight.qdata, before)
    x = torch.sin(torch.arange(200)[:, None].float() * torch.linspace(0.1, 3.0, 64))
    err = lambda q: float(((x @ (w0["a"] - (q.float() * scale.repeat_interleave(G, 1))).T) ** 2).mean())  # noqa: E731
    assert err(m.a.weight.qdata) < err(before)


def test_a_recipe_with_gptq_re_rounds_exactly_its_int4_linears():
    """``XnnpackRecipe(..., gptq=True)`` with a tokenizer: GPTQ re-rounds exactly the int4 linears
    (of a 2-layer model: q/k/o and the MLP of layer 0; layer 1, every v_proj and the head int8),
    on the grid round-to-nearest chose (same scales); the int8 linears are RTN's to the bit."""
    from fxport.lowering.xnnpack_quant import INT4_G32_HQQ, INT8_PC, XnnpackRecipe, quantize_for_xnnpack
    from fxport.models.gemma4.config import FULL, SLIDING, get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM
    from fxport.tests.quant.test_smoothing import ByteTokenizer

    cfg = get_preset("tiny-gemma3").replace(num_hidden_layers=2, layer_types=[SLIDING, FULL])
    rules = ((r"lm_head\.weight", INT8_PC), (r".*self_attn\.v_proj\.weight", INT8_PC),
             (r".*layers\.1\..*", INT8_PC), (r".*", INT4_G32_HQQ))
    models, reports = [], []
    for gptq in (True, False):
        torch.manual_seed(0)
        model = Gemma4ForCausalLM(cfg, max_seq_len=64).eval()
        recipe = XnnpackRecipe("int4-gptq", rules, gptq=gptq, calibration_tokens=4 * 63)
        reports.append(quantize_for_xnnpack(model, recipe, tokenizer=ByteTokenizer(cfg.vocab_size)))
        models.append(model)
    rep, rtn = reports
    assert rep.gptq == "GPTQ rounding for 6 int4 linear(s)" and rtn.gptq is None
    assert rep.calibration.startswith("252 tokens of pydoc_data.topics")
    assert rep.smoothing is None
    int4 = sorted(n for n, k in rep.quantized.items() if k.startswith("8da4w"))
    assert int4 == [f"model.layers.0.{n}" for n in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                    "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj")]
    mods = [dict(m.named_modules()) for m in models]
    for name in rep.quantized:
        w, w0 = mods[0][name].weight, mods[1][name].weight
        assert torch.equal(w.scale, w0.scale), name
        assert torch.equal(w.qdata, w0.qdata) == (name not in int4), name
