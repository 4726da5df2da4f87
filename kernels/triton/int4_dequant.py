"""Triton int4 dequantization for prefill: packed (N, K/2) uint8 -> dense (N, K).

``w[n, k] = ((q[n, k] - zeros[n, g]) * scales[n, g]).to(dtype)``, ``g = k // GROUP``, with the
subtraction done in the output dtype like torchao's ``dequantize_affine`` (exact for integer
zeros). The dense weight then feeds an ordinary ``mm`` (cuBLAS via the backend): for M in the
hundreds the matmul is compute-bound and the extra write+read of the bf16 weight is amortised.
Program ``(pid_n, pid_k)`` converts a ``BLOCK_N x BLOCK_K2`` tile of bytes into 2 * BLOCK_K2
columns, written contiguously (``tl.interleave`` of the low / high nibble values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,
    N, K2,
    stride_wn, stride_sn, stride_on,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    GROUPED: tl.constexpr,  # GROUP a power of two with GROUP // 2 dividing BLOCK_K2
    NG: tl.constexpr,  # groups per tile (GROUPED only)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k2 = pid_k * BLOCK_K2 + tl.arange(0, BLOCK_K2)  # (BK2,)
    mask = (offs_n < N)[:, None] & (offs_k2 < K2)[None, :]
    b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k2[None, :], mask=mask, other=0)  # (BN, BK2) u8
    if GROUPED:  # one scale/zero load per group, broadcast in registers
        offs_g = (pid_k * BLOCK_K2 * 2) // GROUP + tl.arange(0, NG)
        gmask = (offs_n < N)[:, None] & (offs_g * (GROUP // 2) < K2)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=gmask, other=0.0)
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=gmask, other=0.0)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GROUP // 2)), (BLOCK_N, BLOCK_K2))
        z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, NG, GROUP // 2)), (BLOCK_N, BLOCK_K2))
    else:
        grp = (offs_k2 * 2) // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=mask, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    z = z.to(out_ty)
    w_lo = (((b & 0xF).to(out_ty) - z) * s).to(out_ty)
    w_hi = (((b >> 4).to(out_ty) - z) * s).to(out_ty)
    w = tl.interleave(w_lo, w_hi)  # (BN, 2 * BK2): columns 2j, 2j + 1 side by side, contiguous stores
    offs_k = pid_k * 2 * BLOCK_K2 + tl.arange(0, 2 * BLOCK_K2)
    out = out_ptr + offs_n[:, None] * stride_on + offs_k[None, :]
    tl.store(out, w, mask=(offs_n < N)[:, None] & (offs_k < 2 * K2)[None, :])


def int4_dequant_launch(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    traceable: bool = False,
    block_n: int = 32,
    block_k2: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Dense (N, K) weight in ``dtype``. ``traceable=True`` launches through ``wrap_triton``."""
    n, k2 = packed.shape
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty((n, 2 * k2), device=packed.device, dtype=dtype)  # (N, K)
    block_k2 = min(block_k2, triton.next_power_of_2(k2))
    grouped = group_size & (group_size - 1) == 0
    if grouped:
        block_k2 = max(block_k2, group_size // 2)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k2, block_k2))
    kernel = _int4_dequant_kernel
    if traceable:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[grid](
        packed, scales, zeros, out,
        n, k2,
        packed.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=block_n, BLOCK_K2=block_k2,
        GROUPED=grouped, NG=max(1, 2 * block_k2 // group_size) if grouped else 1, num_warps=num_warps,
    )
    return out
