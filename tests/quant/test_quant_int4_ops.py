"""torch.library int4 ops: schemas, fake impls (export shapes), CPU reference impls, errors."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxport.kernels.int4_ops  # noqa: F401
from fxport.quant.packed import pack_int4
from fxport.quant.quantize import quantize_minmax


def test_schemas():
    assert str(torch.ops.fxport.int4_gemv.default._schema) == (
        "fxport::int4_gemv(Tensor x, Tensor packed, Tensor scales, Tensor zeros, SymInt group_size) -> Tensor"
    )
    assert str(torch.ops.fxport.int4_dequant.default._schema) == (
        "fxport::int4_dequant(Tensor packed, Tensor scales, Tensor zeros, SymInt group_size, ScalarType dtype) -> Tensor"
    )


def test_fake_impls_give_shapes():
    with FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        packed = torch.empty(48, 32, dtype=torch.uint8)
        s = torch.empty(48, 2, dtype=torch.bfloat16)
        out = torch.ops.fxport.int4_gemv(x, packed, s, s, 32)
        w = torch.ops.fxport.int4_dequant(packed, s, s, 32, torch.float16)
    assert (out.shape, out.dtype) == ((2, 3, 48), torch.bfloat16)
    assert (w.shape, w.dtype) == ((48, 64), torch.float16)


def test_cpu_reference_impls():
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    qw = quantize_minmax(w, 4, 32)
    dense = qw.dequantize()
    x = torch.randn(3, 96)
    got = torch.ops.fxport.int4_gemv(x, qw.packed, qw.scales, qw.zeros, 32)
    torch.testing.assert_close(got, x @ dense.t(), rtol=1e-5, atol=1e-5)  # fp32 sum order
    assert torch.equal(torch.ops.fxport.int4_dequant(qw.packed, qw.scales, qw.zeros, 32, torch.float32), dense)


def test_shape_errors():
    packed = pack_int4(torch.zeros(4, 64, dtype=torch.uint8))
    s = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"x has K = 32 but packed weight \(N, K/2\) = \(4, 32\) gives K = 64"):
        torch.ops.fxport.int4_gemv(torch.randn(1, 32), packed, s, s, 32)
    with pytest.raises(ValueError, match="group_size 24 must be even and divide K = 64"):
        torch.ops.fxport.int4_dequant(packed, s, s, 24, torch.float32)
    with pytest.raises(ValueError, match=r"scales \(4, 1\) / zeros \(4, 2\) must be \(N, K // group_size\) = \(4, 2\)"):
        torch.ops.fxport.int4_dequant(packed, s[:, :1], s, 32, torch.float32)
