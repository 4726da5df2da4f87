"""Tiled flash attention in Triton (prefill chunks): the impl of ``fxport::sdpa``.

Layout and contract (see :mod:`fxport.kernels.attention_ops`)::

    q (B, H_q, L, D); k, v (B, H_kv, S, D), H_q % H_kv == 0; mask broadcastable to
    (B, H_q, L, S) (bool, True = attend, or additive float; any strides, e.g. the gathered
    ring-buffer mask); valid_len None or (), (1,), (B,); is_causal (aten's top-left
    convention: key j attends to query i iff j <= i); window > 0: also i - j < window
    -> out (B, H_q, L, D)

Grid (cdiv(L, BLOCK_M), B * H_q). A program owns BLOCK_M queries of one head and reads KV
head h // N_REP (native GQA, no expansion). It sweeps only the KV blocks that can hold an
attended key: [0, min(S, valid_len)) intersected, when causal, with [first query - window + 1,
last query]; inside that range, keys are masked per element. Online softmax in fp32 with the
running max (no fixed offset); a query row without any key is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from fxport.kernels.triton._common import _attend_block, dot_precision, launch, mask_args, valid_len_args


@dataclass(frozen=True)
class SdpaConfig:
    """block_m queries x block_n keys per tile; num_warps / num_stages: Triton launch knobs."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_sdpa_config(D: int) -> SdpaConfig:
    """Largest tiles that compile for sm_90 without register spills, with or without a mask
    (checked offline by ``bench/sdpa.py`` without a GPU: ptxas registers / stack / smem)."""
    if D <= 128:
        return SdpaConfig(128, 64, 8, 2)
    if D <= 256:
        return SdpaConfig(64, 64, 8, 2)
    return SdpaConfig(32, 64, 8, 2)


@triton.jit
def _sdpa_fwd(
    Q, K, V, Mask, ValidLen, Out,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_mn,
    stride_lb,
    stride_ob, stride_oh, stride_ol, stride_od,
    H_q, L, S, D, scale, window,
    N_REP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_VALID_LEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_q).to(tl.int64)  # 64-bit base offsets: B * H * S * D may exceed 2^31
    h = (pid_bh % H_q).to(tl.int64)
    hkv = h // N_REP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    hi = S
    if HAS_VALID_LEN:
        hi = tl.minimum(tl.maximum(tl.load(ValidLen + b * stride_lb).to(tl.int32), 0), S)
    lo = 0
    win = tl.where(window > 0, window, 2147483647)  # window 0: no window
    if IS_CAUSAL:
        hi = tl.minimum(hi, pid_m * BLOCK_M + BLOCK_M)  # keys after the last query: none
        lo_w = tl.maximum(pid_m * BLOCK_M - window + 1, 0)  # first key of the first query's window
        lo = tl.where(window > 0, (lo_w // BLOCK_N) * BLOCK_N, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    m_rows = Mask + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_ml  # (BLOCK_M, 1)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        keep = m_ok[:, None] & n_ok[None, :]  # (BLOCK_M, BLOCK_N)
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
            keep = keep & (offs_m[:, None] - offs_n[None, :] < win)
        m_i, l_i, acc = _attend_block(
            q, k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok[:, None] & d_ok[None, :],
            keep, m_rows + offs_n[None, :] * stride_mn, m_i, l_i, acc, scale, MASK_KIND, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows without keys: acc = 0 -> 0
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def launch_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    valid_len: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
    config: Optional[SdpaConfig] = None,
    warmup: bool = False,
):
    """Launch the tiled kernel (through ``wrap_triton``, so AOTInductor can capture it) and
    return the output; with ``warmup``, compile only and return ``[compiled kernel]``."""
    B, H_q, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if window > 0 and not is_causal:
        raise ValueError(f"sdpa: window={window} needs is_causal=True")
    cfg = config or default_sdpa_config(D)
    if config is None and isinstance(L, int) and L <= 16:  # decode-like: one 16-row tile (tl.dot minimum)
        cfg = SdpaConfig(16, cfg.block_n, cfg.num_warps, cfg.num_stages)
    out = torch.empty_like(q)
    mask_kind, mask, ms = mask_args(attn_mask, B, H_q, L, S, q)
    has_vl, vl, svl = valid_len_args(valid_len, B, q)
    kernel = launch(_sdpa_fwd, (triton.cdiv(L, cfg.block_m), B * H_q), (
        q, k, v, mask, vl, out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        ms[0], ms[1], ms[2], ms[3],
        svl,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H_q, L, S, D, float(scale), int(window),
    ), dict(
        N_REP=H_q // H_kv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        MASK_KIND=mask_kind, HAS_VALID_LEN=has_vl, IS_CAUSAL=bool(is_causal),
        PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ), warmup)
    return [kernel] if warmup else out
