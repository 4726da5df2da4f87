"""Triton int4 GEMV for decode: ``out (M, N) = x (M, K) @ dequant(packed (N, K/2)).T``.

Layout: canonical int4 (:mod:`fxport.quant.packed`): byte ``packed[n, j]`` holds codes of
columns ``2j`` (low nibble) and ``2j + 1`` (high nibble); ``w = (q - zeros[g]) * scales[g]``
with ``g = k // GROUP``.

Work split: program ``(pid_n, pid_k, pid_m)`` owns ``BLOCK_N`` output rows, one K slice of
``K2_PER_SPLIT`` packed bytes and ``BLOCK_M`` rows of x. For M <= BLOCK_M every weight byte is
read exactly once. When N alone gives too few programs to fill the GPU (small N or M = 1 on a
large part), K is split too: each split writes an fp32 partial ``(SPLIT, M, N)`` that is summed
afterwards (deterministic, no atomics). Accumulation is fp32.

Two kernels: ``_int4_gemv_grouped_kernel`` for power-of-two group sizes (the weight tile is
viewed as (BLOCK_N, groups, GROUP // 2) bytes so each scale/zero is loaded once per row and
group), and ``_int4_gemv_kernel`` for any other even group size (scales gathered per column).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemv_grouped_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K2, K2_PER_SPLIT,
    stride_xm, stride_wn, stride_sn,
    G2: tl.constexpr,  # packed bytes per group: GROUP // 2 (a power of two)
    NG: tl.constexpr,  # groups per K tile; the tile is NG * G2 bytes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Power-of-two groups: the weight tile is (BLOCK_N, NG, G2) bytes, so one scale/zero per
    (row, group) is loaded and broadcast over the group's bytes with no reshape."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_g = tl.arange(0, NG)
    offs_j = tl.arange(0, G2)
    n_mask = offs_n < N
    k2_start = pid_k * K2_PER_SPLIT
    k2_end = tl.minimum(k2_start + K2_PER_SPLIT, K2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k2_start, k2_end, NG * G2):
        grp = kb // G2 + offs_g  # (NG,) group index
        g_ok = grp * G2 < k2_end  # whole groups only: K2 and the split bounds are multiples of G2
        col = grp[:, None] * G2 + offs_j[None, :]  # (NG, G2) packed byte column
        b = tl.load(
            w_ptr + offs_n[:, None, None] * stride_wn + col[None, :, :],
            mask=n_mask[:, None, None] & (col < k2_end)[None, :, :], other=0,
        )  # (BN, NG, G2) u8
        sz_off = offs_n[:, None] * stride_sn + grp[None, :]
        sz_mask = n_mask[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]  # (BN, NG, 1)
        z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
        w_lo = ((b & 0xF).to(tl.float32) - z) * s  # (BN, NG, G2) columns 2j
        w_hi = ((b >> 4).to(tl.float32) - z) * s  # columns 2j + 1
        for i in tl.static_range(BLOCK_M):
            m = pid_m * BLOCK_M + i
            x_mask = g_ok[:, None] & ((col * 0 + m) < M)  # (NG, G2); built full-shape for the interpreter
            x_lo = tl.load(x_ptr + m * stride_xm + 2 * col, mask=x_mask, other=0.0).to(tl.float32)  # (NG, G2)
            x_hi = tl.load(x_ptr + m * stride_xm + 2 * col + 1, mask=x_mask, other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :], axis=2), axis=1)  # (BN,)
            acc = tl.where((offs_m == m)[:, None], acc + part[None, :], acc)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K2, K2_PER_SPLIT,
    stride_xm, stride_wn, stride_sn,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K2: tl.constexpr,
):
    """Any even group size: scales and zeros gathered per packed column."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k2_start = pid_k * K2_PER_SPLIT
    k2_end = tl.minimum(k2_start + K2_PER_SPLIT, K2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k2_start, k2_end, BLOCK_K2):
        offs_k2 = kb + tl.arange(0, BLOCK_K2)  # (BK2,) packed columns
        k_mask = offs_k2 < k2_end
        wmask = n_mask[:, None] & k_mask[None, :]
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k2[None, :], mask=wmask, other=0)  # (BN, BK2) u8
        grp = (offs_k2 * 2) // GROUP  # even and odd column share a group (GROUP is even)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + grp[None, :], mask=wmask, other=0.0).to(tl.float32)
        w_lo = ((b & 0xF).to(tl.float32) - z) * s  # (BN, BK2) columns 2j
        w_hi = ((b >> 4).to(tl.float32) - z) * s  # (BN, BK2) columns 2j + 1
        xmask = m_mask[:, None] & k_mask[None, :]
        x_base = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_k2[None, :]
        x_lo = tl.load(x_base, mask=xmask, other=0.0).to(tl.float32)  # (BM, BK2)
        x_hi = tl.load(x_base + 1, mask=xmask, other=0.0).to(tl.float32)
        prod = x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :]  # (BM, BN, BK2)
        acc += tl.sum(prod, axis=2)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter / CPU: small, so that tests exercise split-K


def gemv_config(
    m: int, n: int, k2: int, num_sms: int, block_n: int = 32, block_k2: int = 128, group_size: int = 32
) -> dict[str, int]:
    """Tile sizes and split-K for (M, N, K/2): enough programs for ~4 waves over ``num_sms``.

    A power-of-two group size uses the grouped kernel (one scale/zero load per group; K tile
    ``BLOCK_K2`` a multiple of GROUP // 2, ``NG`` groups). Otherwise the generic kernel, whose
    (BLOCK_M, BLOCK_N, BLOCK_K2) product is kept small for registers.
    """
    block_m = min(triton.next_power_of_2(max(m, 1)), 8)
    block_k2 = min(block_k2, triton.next_power_of_2(k2))
    g2 = group_size // 2
    grouped = group_size & (group_size - 1) == 0
    if grouped:
        block_k2 = max(block_k2, g2)
    else:
        block_k2 = max(16, block_k2 // block_m)
    n_blocks = triton.cdiv(n, block_n)
    m_blocks = triton.cdiv(m, block_m)
    want = max(1, (4 * num_sms) // (n_blocks * m_blocks))
    split = max(1, min(want, triton.cdiv(k2, block_k2)))
    k2_per_split = triton.cdiv(triton.cdiv(k2, split), block_k2) * block_k2
    split = triton.cdiv(k2, k2_per_split)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K2=block_k2, SPLIT=split, K2_PER_SPLIT=k2_per_split,
        GROUPED=int(grouped), NG=max(1, 2 * block_k2 // group_size) if grouped else 1,
    )


def int4_gemv_launch(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    traceable: bool = False,
    split_k: int | None = None,
    block_n: int = 32,
    block_k2: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:
    """Run the GEMV. x (..., K) -> (..., N) in x's dtype.

    ``traceable=True`` launches through ``wrap_triton`` (inside the ``triton_op``);
    ``split_k`` forces the number of K splits (tests); tile sizes are overridable for benches.
    """
    n, k2 = packed.shape
    k = x.shape[-1]
    if k != 2 * k2:
        raise ValueError(f"int4_gemv: x has K = {k}, packed weight {tuple(packed.shape)} has K = {2 * k2}")
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    cfg = gemv_config(m, n, k2, _num_sms(x.device), block_n, block_k2, group_size)
    if split_k is not None:
        cfg["K2_PER_SPLIT"] = triton.cdiv(triton.cdiv(k2, split_k), cfg["BLOCK_K2"]) * cfg["BLOCK_K2"]
        cfg["SPLIT"] = triton.cdiv(k2, cfg["K2_PER_SPLIT"])
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    partial = torch.empty((cfg["SPLIT"], m, n), device=x.device, dtype=torch.float32)  # (S, M, N)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT"], triton.cdiv(m, cfg["BLOCK_M"]))
    kernel = _int4_gemv_grouped_kernel if cfg["GROUPED"] else _int4_gemv_kernel
    if traceable:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    args = (x2, packed, scales, zeros, partial, m, n, k2, cfg["K2_PER_SPLIT"], x2.stride(0), packed.stride(0), scales.stride(0))
    if cfg["GROUPED"]:
        kernel[grid](
            *args, G2=group_size // 2, NG=cfg["NG"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=num_warps
        )
    else:
        kernel[grid](
            *args, GROUP=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K2=cfg["BLOCK_K2"],
            num_warps=num_warps,
        )
    out = partial[0] if cfg["SPLIT"] == 1 else partial.sum(0)  # (M, N) fp32
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
