"""Split-K flash decoding (1..4 queries per head) in Triton: the impl of ``fxport::sdpa_decode_splitk``.

Layout and contract (see :mod:`fxport.kernels.attention_ops`)::

    q (B, H_q, L, D) with 1 <= L <= MAX_QUERIES (4: a decode step, or a speculative-decoding
    verification step of up to 4 draft tokens); k, v (B, H_kv, S, D); mask broadcastable to
    (B, H_q, L, S); valid_len None or (), (1,), (B,) integer; causal: the L queries are the
    last L positions of the valid range n (n = valid_len or S), query i attends keys
    j <= n - L + i; -> out (B, H_q, L, D)

Two kernels:
  1. ``_splitk_partial``, grid (B * H_kv, NUM_SPLITS). A program owns one KV head and all
     N_REP x L query rows that read it (native GQA: the (N_REP * L, D) query tile is a ``tl.dot``
     operand, K/V are read once per KV head and never expanded) and one slice of the valid
     KV range. The valid range [0, valid_len) is divided evenly over the splits *on the
     device*, so every split has work whatever the fill level of the cache and no KV block at
     index >= valid_len is ever loaded. It keeps a running max ``m``, sum ``l`` and
     accumulator (true online softmax: every exponent is ``exp(s - m)`` with ``m`` the
     running max, no fixed offset, so logits of 1e3 are exact) and writes (m, l, acc) in fp32.
  2. ``_splitk_reduce``, grid (B * H_q * L, D / 128): ``M = max_i m_i``, ``out = sum_i e^(m_i - M) acc_i /
     sum_i e^(m_i - M) l_i``; a split without keys has m = -inf, l = 0 and weighs 0; a row
     without any key is 0 (as aten SDPA).

Launch configuration is explicit (:class:`DecodeConfig`); tests pass a tiny one under
``TRITON_INTERPRET=1``. NUM_SPLITS is a runtime argument (only its power-of-two bucket is a
compile-time constant of the reduce), so a new cache length does not compile a new kernel. The split count is :func:`choose_num_splits`, a pure function of the
SM count, the number of (batch, KV head) programs and L_kv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from fxport.kernels.triton._common import _attend_block, dot_precision, launch, mask_args, valid_len_args


MAX_QUERIES = 4  # queries per head the split-K kernel takes (decode + speculative verification)
DEFAULT_SMS = 132  # SM count assumed when no CUDA device is visible (H100 SXM; H200 has the same)


@dataclass(frozen=True)
class DecodeConfig:
    """block_n: keys per inner iteration; num_splits: programs along the KV axis per KV head
    (None: :func:`choose_num_splits`); num_warps / num_stages: Triton launch knobs."""

    block_n: int = 64
    num_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2


def choose_num_splits(S: int, kv_programs: int, sms: int = DEFAULT_SMS, *, programs_per_sm: int = 4,
                      min_keys_per_split: int = 256, max_splits: int = 256) -> int:
    """Split count for L_kv = ``S`` keys and ``kv_programs`` = B * H_kv programs per split.

    Enough splits to give every SM ``programs_per_sm`` programs (``cdiv(sms * programs_per_sm,
    kv_programs)``: one wave cannot hide the HBM latency of a single program), but no split
    with fewer than ``min_keys_per_split`` keys (below that the fp32 partials written and
    re-read by the reduce cost more than the keys read), at least 1, at most ``max_splits``.
    A pure function of its arguments (unit-tested); the launcher passes the device's SM count.

    31B global layer (B 1, H_kv 4) on 132 SMs: S = 4K -> 16, 32K -> 128, 128K -> 132.
    """
    if S < 0 or kv_programs < 1 or sms < 1:
        raise ValueError(f"choose_num_splits: need S >= 0, kv_programs >= 1, sms >= 1; got {S}, {kv_programs}, {sms}")
    by_occupancy = -(-(sms * programs_per_sm) // kv_programs)
    by_length = S // min_keys_per_split
    return max(1, min(by_occupancy, by_length, max_splits))


def device_sms(device: torch.device) -> int:
    """The SM count of ``device`` when it is a visible CUDA device, else :data:`DEFAULT_SMS`."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def default_decode_config(D: int, S: int, kv_programs: int, device: torch.device) -> DecodeConfig:
    """A heuristic config for S keys and kv_programs = B * H_kv: 32..64 keys per block (>= 32 KiB of K+V in flight per stage), 8 warps
    for D > 128; spill-free on sm_90 (the compile check of ``bench/sdpa.py`` without a GPU)."""
    block_n = 64 if D <= 128 else 32
    num_warps = 4 if D <= 128 else 8
    splits = choose_num_splits(S, kv_programs, device_sms(device))
    return DecodeConfig(block_n=block_n, num_splits=splits, num_warps=num_warps, num_stages=2)


@triton.jit
def _splitk_partial(
    Q, K, V, Mask, ValidLen, Acc, Mx, Sm,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_mn,
    stride_lb,
    H_kv, S, D, scale, NUM_SPLITS,
    N_REP: tl.constexpr, L_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_VALID_LEN: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_kv).to(tl.int64)  # 64-bit base offsets: B * H * S * D may exceed 2^31
    hkv = (pid_bh % H_kv).to(tl.int64)

    # rows r = (query head of this KV head) * L_Q + query index
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < N_REP * L_Q
    d_ok = offs_d < D
    qh = hkv * N_REP + offs_r // L_Q  # query head of each row
    ql = offs_r % L_Q  # query index of each row

    q = tl.load(
        Q + b * stride_qb + qh[:, None] * stride_qh + ql[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=r_ok[:, None] & d_ok[None, :], other=0.0,
    )  # (BLOCK_R, BLOCK_D)

    # The valid range [0, n) is split evenly (in whole blocks) over NUM_SPLITS programs.
    n = S
    if HAS_VALID_LEN:
        n = tl.minimum(tl.maximum(tl.load(ValidLen + b * stride_lb).to(tl.int32), 0), S)
    blocks = tl.cdiv(n, BLOCK_N)
    per_split = tl.cdiv(blocks, NUM_SPLITS) * BLOCK_N
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, n)
    last = n - L_Q + ql  # causal: the last key each row attends to

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    m_rows = Mask + b * stride_mb + qh[:, None] * stride_mh + ql[:, None] * stride_ml  # (BLOCK_R, 1)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        keep = r_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= last[:, None])
        m_i, l_i, acc = _attend_block(
            q, k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok[:, None] & d_ok[None, :],
            keep, m_rows + offs_n[None, :] * stride_mn, m_i, l_i, acc, scale,
            MASK_KIND, PRECISION)

    # partials (B, H_q, L_Q, NUM_SPLITS[, D]): row ((b * H_q + qh) * L_Q + ql) * NUM_SPLITS + split
    row = ((b * H_kv * N_REP + qh) * L_Q + ql) * NUM_SPLITS + pid_s
    tl.store(Mx + row, m_i, mask=r_ok)
    tl.store(Sm + row, l_i, mask=r_ok)
    tl.store(Acc + row[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _splitk_reduce(
    Acc, Mx, Sm, Out,
    stride_ob, stride_oh, stride_ol, stride_od,
    H_q, D, NUM_SPLITS,
    L_Q: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H_q + h) * L_Q + query index
    pid_d = tl.program_id(1)  # slice of the head dim
    b = (pid // (H_q * L_Q)).to(tl.int64)
    h = ((pid // L_Q) % H_q).to(tl.int64)
    ql = (pid % L_Q).to(tl.int64)
    # global max and denominator over all splits (NUM_SPLITS scalars)
    offs_all = tl.arange(0, SPLITS_P2)
    all_ok = offs_all < NUM_SPLITS
    m_all = tl.load(Mx + pid * NUM_SPLITS + offs_all, mask=all_ok, other=float("-inf"))
    l_all = tl.load(Sm + pid * NUM_SPLITS + offs_all, mask=all_ok, other=0.0)
    big_m = tl.max(m_all, 0)
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
    den = tl.sum(l_all * tl.exp(m_all - big_m), 0)  # splits without keys: exp(-inf) = 0
    # numerator, BLOCK_S splits at a time (bounded registers for D = 512 and many splits)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    num = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        row = pid * NUM_SPLITS + offs_s
        w = tl.exp(tl.load(Mx + row, mask=s_ok, other=float("-inf")) - big_m)
        acc = tl.load(Acc + row[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        num += tl.sum(acc * w[:, None], 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(Out + b * stride_ob + h * stride_oh + ql * stride_ol + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=d_ok)


def launch_sdpa_decode_splitk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    valid_len: Optional[torch.Tensor],
    scale: float,
    config: Optional[DecodeConfig] = None,
    warmup: bool = False,
    causal: bool = False,
):
    """Launch both kernels (through ``wrap_triton``, so AOTInductor can capture them) and
    return the output; with ``warmup``, compile only and return the two compiled kernels."""
    B, H_q, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if not 1 <= L <= MAX_QUERIES:
        raise ValueError(f"sdpa_decode_splitk: needs 1 <= L <= {MAX_QUERIES} queries; got q {tuple(q.shape)}; "
                         "use fxport::sdpa for longer chunks")
    n_rep = H_q // H_kv
    num_splits = (config.num_splits if config is not None else None) or \
        choose_num_splits(S, B * H_kv, device_sms(q.device))
    cfg = config or default_decode_config(D, S, B * H_kv, q.device)
    out = torch.empty_like(q)
    acc = torch.empty((B, H_q, L, num_splits, D), dtype=torch.float32, device=q.device)
    mx = torch.empty((B, H_q, L, num_splits), dtype=torch.float32, device=q.device)
    sm = torch.empty((B, H_q, L, num_splits), dtype=torch.float32, device=q.device)
    mask_kind, mask, ms = mask_args(attn_mask, B, H_q, L, S, q)
    has_vl, vl, svl = valid_len_args(valid_len, B, q)
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(16, triton.next_power_of_2(n_rep * L))
    partial = launch(_splitk_partial, (B * H_kv, num_splits), (
        q, k, v, mask, vl, acc, mx, sm,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        ms[0], ms[1], ms[2], ms[3],
        svl,
        H_kv, S, D, float(scale), num_splits,
    ), dict(
        N_REP=n_rep, L_Q=L,
        BLOCK_R=block_r, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        MASK_KIND=mask_kind, HAS_VALID_LEN=has_vl, CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ), warmup)
    block_dr = min(block_d, 128)
    reduce = launch(_splitk_reduce, (B * H_q * L, triton.cdiv(D, block_dr)), (
        acc, mx, sm, out,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H_q, D, num_splits,
    ), dict(
        L_Q=L, SPLITS_P2=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_S=min(16, max(2, triton.next_power_of_2(num_splits))), BLOCK_D=block_dr,
        num_warps=4,
    ), warmup)
    return [partial, reduce] if warmup else out
