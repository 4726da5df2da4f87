"""quant_shape_rules: torchao's affine quant ops answer fake propagation from shapes, exactly as
their implementation would (shape, dtype, stride, device, also with a symbolic length), and run
their implementation for everything else (real tensors, tracers recording, odd layouts)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch._subclasses.fake_tensor import FakeTensorMode

import fxport.builder.speedups.quant_shape_rules as rules
from fxport.builder.speedups.quant_shape_rules import quant_shape_rules

torchao = pytest.importorskip("torchao.quantization.quant_primitives")
OPS = torch.ops.torchao


def _meta(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [(str(tuple(t.shape)), t.dtype, str(tuple(t.stride())), t.device.type) for t in outs]


def _fake(mode, t, dynamic_dims=()):
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if i in dynamic_dims else DimDynamic.STATIC
                                                  for i in range(t.dim())])
    return mode.from_tensor(t, symbolic_context=ctx)


def _calls(block_size, x, w):
    """The three ops as the int8-dynamic-activation / intx-weight linears call them (per-token
    activations, group-wise weights), with qparams of the shapes torchao gives them."""
    per_token = [1] * (x.dim() - 1) + [x.shape[-1]]
    sx, sw = x.new_ones(x.shape[:-1]), w.new_ones(w.shape[0], w.shape[1] // block_size[1])
    zx, zw = sx.to(torch.int8), sw.to(torch.int8)
    return [
        lambda: OPS.choose_qparams_affine(x, "ASYMMETRIC", per_token, torch.int8, -128, 127, None, None, torch.int8),
        lambda: OPS.choose_qparams_affine(w, "SYMMETRIC", block_size, torch.int8, -8, 7, 1e-6, torch.float32, torch.int8),
        lambda: OPS.choose_qparams_affine(w, "SYMMETRIC", block_size, torch.int8, -8, 7, None, None, None, True),
        lambda: OPS.choose_qparams_affine(w, "ASYMMETRIC", block_size, torch.uint4, 0, 15, None, torch.bfloat16, None),
        lambda: OPS.quantize_affine(x, per_token, sx, zx, torch.int8, -128, 127),
        lambda: OPS.quantize_affine(w, block_size, sw, zw, torch.uint4, 0, 15),
        lambda: OPS.dequantize_affine(x.to(torch.int8), per_token, sx, zx, torch.int8, -128, 127),
        lambda: OPS.dequantize_affine(w.to(torch.int8), block_size, sw, None, torch.int8, -8, 7, torch.bfloat16),
    ]


def _both(make_inputs, block_size):
    """(torchao's outcome, the rules' outcome) for each call, each in a fresh fake mode."""
    out = []
    for use_rules in (False, True):
        mode = FakeTensorMode(shape_env=ShapeEnv())
        x, w = make_inputs(mode)
        with mode, (quant_shape_rules() if use_rules else torch.no_grad()):
            out.append([_outcome(call) for call in _calls(block_size, x, w)])
    return out


def _outcome(call):
    """The outputs' metadata, or the error torchao raises (all-ones blocks: reductions over nothing)."""
    try:
        return _meta(call())
    except RuntimeError as e:
        return ("error", str(e))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([1, 2, 8, 32]),
       tokens=st.integers(2, 9), dynamic=st.booleans())
def test_rules_give_torchaos_metadata(rows, groups, group, tokens, dynamic):
    k = groups * group

    def inputs(mode):
        x = _fake(mode, torch.randn(1, tokens, k), dynamic_dims=(1,) if dynamic else ())
        return x, _fake(mode, torch.randn(rows, k))

    reference, fast = _both(inputs, [1, group])
    assert fast == reference


def test_rules_answer_only_pure_fake_propagation():
    x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
    calls = []
    real_fake_only = rules._fake_only
    rules._fake_only = lambda t: calls.append(real_fake_only(t)) or calls[-1]
    try:
        with quant_shape_rules():
            # real tensors: torchao's values
            ref = rules._original("choose_qparams_affine")(x, "ASYMMETRIC", [1, 1, 8], torch.int8, -128, 127, None, None, torch.int8)
            got = OPS.choose_qparams_affine(x, "ASYMMETRIC", [1, 1, 8], torch.int8, -128, 127, None, None, torch.int8)
            assert all(torch.equal(a, b) for a, b in zip(ref, got)) and calls == [False]
            # a tracer recording: the implementation is what gets traced
            gm = make_fx(lambda t: OPS.dequantize_affine(t, [1, 8], torch.ones(4, 1), None, torch.int8, -8, 7),
                         tracing_mode="fake")(w.to(torch.int8))
            targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            assert "aten.new_empty.default" not in targets and "aten.mul.Tensor" in targets
            # a non-contiguous fake input: the implementation
            mode = FakeTensorMode()
            with mode:
                xt = mode.from_tensor(x).transpose(0, 2)  # (8, 3, 2)
                qparams = (torch.ones(1, 3, 2), torch.zeros(1, 3, 2, dtype=torch.int8))
                got = OPS.quantize_affine(xt, [8, 1, 1], *qparams, torch.int8)
                ref = rules._original("quantize_affine")(xt, [8, 1, 1], *qparams, torch.int8)
            assert calls[-1] is False and _meta(got) == _meta(ref)
        n = len(calls)
        mode = FakeTensorMode()
        with mode:
            OPS.quantize_affine(mode.from_tensor(x), [1, 1, 8], torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.int8),
                                torch.int8)
        assert calls[n:] == [] and not rules.registered()  # outside the context: torchao's kernel alone
    finally:
        rules._fake_only = real_fake_only
