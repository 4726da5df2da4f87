"""torch.library ops over canonical int4 weights (layout: :mod:`fxport.kernels.int4_layout`).

``fxport::int4_gemv(x, packed, scales, zeros, group_size) -> out``
    x (..., K) float; packed (N, K // 2) uint8 (low nibble = even k); scales, zeros
    (N, K // group_size) float. out (..., N) in x's dtype, accumulated in fp32:
    ``out = x @ ((q - zeros) * scales).T``. Meant for small M = prod(x.shape[:-1]) (decode);
    reads every weight byte once.

``fxport::int4_dequant(packed, scales, zeros, group_size, dtype) -> w``
    w (N, K) in ``dtype``, computed as ``((q - zeros) * scales).to(dtype)`` in ``dtype`` (the
    formula of torchao's ``dequantize_affine``, so integer zeros reproduce it bit for bit).
    Followed by a dense ``linear`` (cuBLAS via the backend) for prefill.

Each op has: a schema (from the type hints), a fake impl (shapes only, for export), a CPU
reference impl (so rewritten programs run and are tested on CPU), and a Triton impl through
``torch.library.triton_op`` + ``wrap_triton`` for CUDA (AOTInductor sees the kernels). The
Triton kernel modules are imported only when a CUDA tensor reaches the op.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from fxport.kernels.int4_layout import dequantize_codes, unpack_int4

__all__ = ["int4_gemv", "int4_dequant", "int4_gemv_reference", "int4_dequant_reference"]


def _check(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, k: int | None = None) -> tuple[int, int]:
    n, k2 = packed.shape
    kk = 2 * k2
    if k is not None and k != kk:
        raise ValueError(f"int4 op: x has K = {k} but packed weight (N, K/2) = {tuple(packed.shape)} gives K = {kk}")
    if group_size <= 0 or group_size % 2 or kk % group_size:
        raise ValueError(f"int4 op: group_size {group_size} must be even and divide K = {kk}")
    if tuple(scales.shape) != (n, kk // group_size) or tuple(zeros.shape) != (n, kk // group_size):
        raise ValueError(
            f"int4 op: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} must be "
            f"(N, K // group_size) = {(n, kk // group_size)}"
        )
    return n, kk


# ----------------------------------------------------------------------------- references


def int4_dequant_reference(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N, K) dense weight from canonical int4 tensors (the definition of the op)."""
    _check(packed, scales, zeros, group_size)
    return dequantize_codes(unpack_int4(packed), scales, zeros, group_size, dtype)


def int4_gemv_reference(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x @ dequant(w).T`` in fp32, returned in x's dtype. x (..., K) -> (..., N)."""
    n, _ = _check(packed, scales, zeros, group_size, x.shape[-1])
    w = dequantize_codes(unpack_int4(packed), scales, zeros, group_size, torch.float32)  # (N, K)
    out = x.reshape(-1, x.shape[-1]).to(torch.float32) @ w.t()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- ops


@triton_op("fxport::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    from fxport.kernels.triton.int4_gemv import int4_gemv_launch

    return int4_gemv_launch(x, packed, scales, zeros, group_size, traceable=True)


@triton_op("fxport::int4_dequant", mutates_args=())
def int4_dequant(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    from fxport.kernels.triton.int4_dequant import int4_dequant_launch

    return int4_dequant_launch(packed, scales, zeros, group_size, dtype, traceable=True)


@int4_gemv.register_fake
def _int4_gemv_fake(x, packed, scales, zeros, group_size):
    n, _ = _check(packed, scales, zeros, group_size, x.shape[-1])
    return x.new_empty((*x.shape[:-1], n))


@int4_dequant.register_fake
def _int4_dequant_fake(packed, scales, zeros, group_size, dtype):
    n, k = _check(packed, scales, zeros, group_size)
    return packed.new_empty((n, k), dtype=dtype)


int4_gemv.register_kernel("cpu")(int4_gemv_reference)
int4_dequant.register_kernel("cpu")(int4_dequant_reference)
