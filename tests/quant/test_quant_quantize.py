"""Quantizers: min-max (torchao affine) and HQQ into the canonical form; model walk with a recipe."""

import pytest
import torch
from torch import nn

from fxport.quant.packed import QuantFormatError
from fxport.quant.quantize import dequantize_into, quantize_hqq, quantize_minmax, quantize_model, quantize_weight
from fxport.quant.recipe import QuantConfig, QuantRecipe, QuantRule


def _w(n=16, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_asymmetric_matches_definition(bits):
    w, g = _w(), 32
    qw = quantize_minmax(w, bits=bits, group_size=g)
    assert qw.packed.shape == ((16, 64) if bits == 4 else (16, 128))
    grp = w.reshape(16, 4, g)
    lo, hi = grp.amin(-1).clamp(max=0), grp.amax(-1).clamp(min=0)  # zero is representable
    qmax = 2**bits - 1
    torch.testing.assert_close(qw.scales, (hi - lo) / qmax, rtol=1e-6, atol=0)  # fp32 rounding
    assert torch.equal(qw.zeros, qw.zeros.round()) and qw.zeros.min() >= 0 and qw.zeros.max() <= qmax
    codes = qw.codes
    assert int(codes.max()) <= qmax
    err = (qw.dequantize() - w).abs().reshape(16, 4, g)
    assert bool((err <= qw.scales[..., None] * 0.5 + 1e-6).all())  # round-to-nearest, no clamping


def test_minmax_symmetric_has_zero_8():
    w = _w()
    qw = quantize_minmax(w, bits=4, group_size=32, symmetric=True)
    assert torch.equal(qw.zeros, torch.full_like(qw.zeros, 8.0))
    err = (qw.dequantize() - w).abs().reshape(16, 4, 32)
    assert bool((err <= qw.scales[..., None] + 1e-6).all())  # code 8 of [-8, 7] may clamp to 7


def test_per_channel_group():
    qw = quantize_minmax(_w(n=5, k=96), bits=8, group_size=None, symmetric=True)
    assert (qw.group_size, qw.scales.shape, qw.zeros[0, 0].item()) == (96, (5, 1), 128.0)


def test_hqq_beats_minmax_on_mean_abs_error():
    w = _w(n=64, k=256)
    mm = (quantize_minmax(w, 4, 64).dequantize() - w).abs().mean().item()
    hqq_w = quantize_hqq(w, 4, 64)
    hqq = (hqq_w.dequantize() - w).abs().mean().item()
    assert int(hqq_w.codes.max()) <= 15 and bool((hqq_w.scales > 0).all())
    assert hqq < mm  # HQQ minimises an Lp (p < 1) error; measured ~0.94x min-max here


def test_bad_group_size_message():
    with pytest.raises(QuantFormatError, match="group_size 48 does not divide in_features 128"):
        quantize_minmax(_w(), 4, 48)
    with pytest.raises(QuantFormatError, match="HQQ is asymmetric"):
        quantize_weight(_w(), QuantConfig(4, 32, "hqq", symmetric=True))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 64)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(64, 32), "down_proj": nn.Linear(32, 64)}) for _ in range(3))


def test_quantize_model_with_recipe_and_dequantize_into():
    torch.manual_seed(0)
    model = _Tiny()
    recipe = QuantRecipe(
        "t",
        (
            QuantRule(r"layers\.\d+\.down_proj\.weight", QuantConfig(8, 32), layers=(-1,)),
            QuantRule(r"layers\.\d+\.(q|down)_proj\.weight", QuantConfig(4, 32)),
        ),
    )
    qws = quantize_model(model, recipe, num_layers=3)
    assert {k: v.bits for k, v in qws.items()} == {
        "layers.0.q_proj.weight": 4, "layers.0.down_proj.weight": 4,
        "layers.1.q_proj.weight": 4, "layers.1.down_proj.weight": 4,
        "layers.2.q_proj.weight": 4, "layers.2.down_proj.weight": 8,
    }
    before = model.embed_tokens.weight.clone()
    dequantize_into(model, qws)
    assert torch.equal(model.layers[2].down_proj.weight, qws["layers.2.down_proj.weight"].dequantize())
    assert torch.equal(model.embed_tokens.weight, before)  # no rule: stays float
