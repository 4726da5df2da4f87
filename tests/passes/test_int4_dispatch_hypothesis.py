"""Int4Dispatch on drawn int4 linears: the weight's form (torchao symmetric / asymmetric
``IntxWeightOnlyConfig``, fxport's ``QuantizedLinear``; torchao int8 to leave alone), group size,
in / out features, bias, one or two linears, batch and length (static or dynamic), method and
``decode_max_m``.

Expected per site from the contract: GEMV iff the method is not prefill, M = B * L is static
and M <= decode_max_m, else dequant + linear (fxport's form is already that: counted, not
rewritten), with the exact reason; the ops and packed constants that follow; values
bit-identical to the unrewritten program on the dequant path, within fp32 summation order on the
GEMV path, and within fp32 rounding of an fp64 linear on the independently dequantized weight
(torchao's ``weight.dequantize()`` / fxport's ``QuantizedWeight.dequantize()``); a second run
changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from torch.export import Dim

from fxport.passes import Int4Dispatch
from fxport.quant.linear import to_quantized_linears
from fxport.quant.quantize import quantize_hqq

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, ops, run_pass

torchao_q = pytest.importorskip("torchao.quantization")
from torchao.quantization.granularity import PerGroup  # noqa: E402

aten = torch.ops.aten
GEMV = torch.ops.fxport.int4_gemv.default
DEQUANT = torch.ops.fxport.int4_dequant.default
TORCHAO_DEQUANT = torch.ops.torchao.dequantize_affine.default
FORMS = ["torchao symmetric", "torchao asymmetric", "fxport"]


class Linears(nn.Module):
    def __init__(self, K, N, bias, two):
        super().__init__()
        self.up = nn.Linear(K, N, bias=bias)
        self.down = nn.Linear(N, K, bias=False) if two else None

    def forward(self, x):  # (B, L, K)
        y = self.up(x)
        return y if self.down is None else self.down(F.gelu(y))


def _quantize(model, form, g):
    """Quantize in place; returns {name: dequantized fp32 weight} computed by the quantizer itself."""
    names = [n for n in ("up", "down") if getattr(model, n) is not None]
    if form == "fxport":
        qws = {f"{n}.weight": quantize_hqq(getattr(model, n).weight, 4, g) for n in names}
        assert to_quantized_linears(model, qws) == names
        return {n: qws[f"{n}.weight"].dequantize() for n in names}
    kwargs = {"mapping_type": torchao_q.MappingType.ASYMMETRIC} if form == "torchao asymmetric" else {}
    dtype = torch.int8 if form == "torchao int8" else torch.int4
    torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(g), **kwargs))
    return {n: getattr(model, n).weight.dequantize() for n in names}


def _choice(method, dynamic, m, limit):
    if method == "prefill":
        return "dequant", "method prefill"
    if dynamic:
        return "dequant", "dynamic M"
    return ("gemv", f"M = {m} <= {limit}") if m <= limit else ("dequant", f"M = {m} > {limit}")


@pytest.mark.parametrize("form", FORMS)  # each form drawn (few examples drift to a few forms)
@examples(3)
@given(g=st.sampled_from([16, 32]), k_groups=st.integers(1, 2),
       n_groups=st.integers(1, 2), bias=st.booleans(), two=st.booleans(), B=st.sampled_from([1, 2]),
       L=st.integers(1, 4), dynamic=st.booleans(), method=st.sampled_from([None, "prefill", "decode"]),
       limit=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_int4_linears_dispatch_by_method_and_m(form, g, k_groups, n_groups, bias, two, B, L, dynamic, method, limit,
                                                seed):
    torch.manual_seed(seed)
    K, N = g * k_groups, g * n_groups
    model = Linears(K, N, bias, two)
    weights = _quantize(model, form, g)
    L = max(L, 2) if dynamic else L
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, K, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=({1: Dim("L", min=2, max=8)},) if dynamic else None)
    new, rec = run_pass(ep, Int4Dispatch(decode_max_m=limit), method=method)

    choice, reason = _choice(method, dynamic, B * L, limit)
    event(f"{form}: {choice}")
    names = list(weights)
    untouched = form == "fxport" and choice == "dequant"  # already dequant + linear
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (
        not untouched, len(names), 0 if untouched else len(names), {})
    assert [(s["choice"], s["reason"], s["from"]) for s in rec.stats.sites] == [
        (choice, reason, "fxport" if form == "fxport" else "torchao")] * len(names)
    counts = ops(new)
    n_gemv = len(names) if choice == "gemv" else 0
    assert (counts[GEMV], counts[DEQUANT], counts[TORCHAO_DEQUANT]) == (n_gemv, len(names) - n_gemv, 0)
    assert counts[aten.linear.default] == len(names) - n_gemv
    if form != "fxport":  # the int8 qdata became packed constants named after each module
        for n in names:
            lin = getattr(model, n)
            packed = new.constants[f"{n}.weight_packed"]
            assert packed.dtype == torch.uint8 and packed.shape == (lin.out_features, lin.in_features // 2)
            assert new.constants[f"{n}.weight_scales"].shape == (lin.out_features, lin.in_features // g)
        assert sorted(new.state_dict) == (["up.bias"] if bias else [])

    for length in ([L, 7] if dynamic else [L]):
        x = torch.randn(B, length, K, generator=gen)
        got, ref = new.module()(x), ep.module()(x)
        if choice == "dequant":
            assert torch.equal(got, ref)  # the same dequant formula, then the same linear: exact
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the GEMV's fp32 summation order
        with torch.no_grad():
            want = F.linear(x.double(), weights["up"].double(), model.up.bias.double() if bias else None)
            if two:
                want = F.linear(F.gelu(want), weights["down"].double())
        assert ((got.double() - want).abs() <= 1e-4 * (1 + want.abs())).all()  # fp32 vs fp64 over K <= 64
    assert_idempotent(new, Int4Dispatch(decode_max_m=limit), method)


@examples(3)
@given(g=st.sampled_from([16, 32]), two=st.booleans(), method=st.sampled_from([None, "prefill", "decode"]))
def test_int8_weights_are_left_alone(g, two, method):
    torch.manual_seed(0)
    model = Linears(2 * g, g, True, two)
    _quantize(model, "torchao int8", g)
    ep = torch.export.export(model, (torch.randn(1, 1, 2 * g),))
    new, rec = run_pass(ep, Int4Dispatch(), method=method)
    n = 2 if two else 1
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten) == (False, 0, 0)
    assert dict(rec.stats.skipped) == {"dequantize_affine is not int4 (int8 storage, range [-8, 7])": n}
    assert ops(new)[TORCHAO_DEQUANT] == n and not ops(new)[GEMV]
