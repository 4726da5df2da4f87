"""Attention ops ``fxport::sdpa`` and ``fxport::sdpa_decode_splitk`` (torch.library).

Each op has
  * a schema inferred from the typed Python signature (``torch.library.triton_op``);
  * a fake impl (shapes only) for ``torch.export`` and :func:`fxport.passes.graph.retrace`;
  * a CPU reference impl, so a rewritten program runs (and is tested) on CPU;
  * its Triton impl for CUDA: the ``triton_op`` body launches the kernels of
    :mod:`fxport.kernels.triton.sdpa` / :mod:`fxport.kernels.triton.sdpa_decode_splitk`
    through ``wrap_triton``, so AOTInductor sees and compiles them into the CUDA program.
    Those kernel modules (and so ``triton.language``) are imported only when a CUDA call or
    a trace for AOTInductor happens, so importing this module is cheap and needs no GPU.

Shared semantics (both ops)::

    q (B, H_q, L, D); k, v (B, H_kv, S, D) with H_q % H_kv == 0   (native GQA: query head h
        reads KV head h // (H_q // H_kv), the head order of the repeat_kv expansion)
    attn_mask: None, bool (True = attend) or additive float, broadcastable to (B, H_q, L, S)
    valid_len: None or an integer tensor of shape (), (1,) or (B,): keys at index
        >= valid_len[b] are excluded (the kernels never read them)
    scale: the softmax scale, explicit (no default from D)
    -> out (B, H_q, L, D) in q's dtype and memory layout (``empty_like(q)``, as aten SDPA);
       a query row with no attended key is 0 (as aten SDPA).

``sdpa`` adds ``is_causal`` (aten's convention: key j attends to query i iff j <= i) and
``window`` (> 0: additionally i - j < window; needs ``is_causal``).
``sdpa_decode_splitk`` takes 1 <= L <= 4 queries (a decode step, or a speculative-decoding
verification step) and ``causal``: the L queries are the last L positions of the valid range
n (n = valid_len[b], or S), query i attends keys j <= n - L + i (bottom-right aligned, unlike
aten's top-left ``is_causal``); with L == 1 it excludes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

__all__ = ["sdpa", "sdpa_decode_splitk", "reference_sdpa", "check_attention_inputs"]


# ----------------------------------------------------------------------------- validation


def check_attention_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    valid_len: Optional[torch.Tensor],
) -> None:
    """Raise ValueError naming the bad input when the shared contract above is violated.

    Only checks that hold for symbolic shapes too (ranks, dtypes, static head counts).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be 4-d (B, H, L, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    h_q, h_kv = q.shape[1], k.shape[1]
    if h_q % h_kv != 0:
        raise ValueError(f"{op}: H_q={h_q} is not a multiple of H_kv={h_kv} (GQA needs H_q % H_kv == 0)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: head dims differ: q D={q.shape[-1]}, k D={k.shape[-1]}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"{op}: attn_mask must be bool (True = attend) or float (additive); got {attn_mask.dtype}")
        if attn_mask.dim() > 4:
            raise ValueError(f"{op}: attn_mask must broadcast to (B, H_q, L, S); got {tuple(attn_mask.shape)}")
    if valid_len is not None:
        if valid_len.is_floating_point() or valid_len.dtype == torch.bool:
            raise ValueError(f"{op}: valid_len must be an integer tensor; got {valid_len.dtype}")
        if valid_len.dim() > 1:
            raise ValueError(f"{op}: valid_len must have shape (), (1,) or (B,); got {tuple(valid_len.shape)}")


# ----------------------------------------------------------------------------- CPU reference


def reference_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    valid_len: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """The ops' semantics in plain aten: expand KV heads, fold every mask into one bool/additive
    mask and call ``F.scaled_dot_product_attention``.

    With a mask that already excludes keys >= valid_len (what :class:`SDPADispatch` passes),
    the folded mask equals the original one, so a rewritten program reproduces the original
    aten SDPA bit for bit on CPU.
    """
    B, H_q, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    n_rep = H_q // H_kv
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H_q, S, D), head h <- KV head h // n_rep
        v = v.repeat_interleave(n_rep, dim=1)
    keep = None  # bool (B or 1, 1, L or 1, S), True = attend
    if valid_len is not None:
        vl = valid_len.reshape(-1, 1, 1, 1).to(torch.int64)
        keep = torch.arange(S, device=q.device).view(1, 1, 1, S) < vl
    if is_causal or window > 0:
        i = torch.arange(L, device=q.device).view(L, 1)
        j = torch.arange(S, device=q.device).view(1, S)
        pos = j <= i
        if window > 0:
            pos = pos & (i - j < window)
        pos = pos.view(1, 1, L, S)
        keep = pos if keep is None else keep & pos
    mask = attn_mask
    if keep is not None:
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _like_q(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in q's memory layout (``empty_like(q)``), the layout aten SDPA and the fake
    impls give, so views the model takes of the result (transpose + view) stay valid."""
    if out.stride() == torch.empty_like(q).stride():
        return out
    return torch.empty_like(q).copy_(out)


# ----------------------------------------------------------------------------- fxport::sdpa


@triton_op("fxport::sdpa", mutates_args=())
def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    valid_len: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
) -> torch.Tensor:
    """Tiled flash attention (prefill chunks); Triton impl (CUDA). Contract: module docstring."""
    from fxport.kernels.triton.sdpa import launch_sdpa

    return launch_sdpa(q, k, v, attn_mask, valid_len, scale, is_causal, window)


def _check_sdpa(q, k, v, attn_mask, valid_len, is_causal, window) -> None:
    check_attention_inputs("fxport::sdpa", q, k, v, attn_mask, valid_len)
    if window < 0 or (window > 0 and not is_causal):
        raise ValueError(f"fxport::sdpa: window={window} needs is_causal=True and window >= 0 (0 = no window)")


@sdpa.register_fake
def _sdpa_fake(q, k, v, attn_mask, valid_len, scale, is_causal, window):
    _check_sdpa(q, k, v, attn_mask, valid_len, is_causal, window)
    return torch.empty_like(q)


@sdpa.register_kernel("cpu")
def _sdpa_cpu(q, k, v, attn_mask, valid_len, scale, is_causal, window):
    _check_sdpa(q, k, v, attn_mask, valid_len, is_causal, window)
    return _like_q(q, reference_sdpa(q, k, v, attn_mask, valid_len, scale, is_causal, window))


# ----------------------------------------------------------------------------- fxport::sdpa_decode_splitk


@triton_op("fxport::sdpa_decode_splitk", mutates_args=())
def sdpa_decode_splitk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    valid_len: Optional[torch.Tensor],
    scale: float,
    causal: bool = False,
) -> torch.Tensor:
    """Split-K flash decoding (1 <= L <= 4); Triton impl (CUDA). Contract: module docstring."""
    from fxport.kernels.triton.sdpa_decode_splitk import launch_sdpa_decode_splitk

    return launch_sdpa_decode_splitk(q, k, v, attn_mask, valid_len, scale, causal=causal)


MAX_DECODE_QUERIES = 4  # = fxport.kernels.triton.sdpa_decode_splitk.MAX_QUERIES (no triton import here)


def _check_decode(q) -> None:
    L = q.shape[2]
    if isinstance(L, int) and not 1 <= L <= MAX_DECODE_QUERIES:
        raise ValueError(f"fxport::sdpa_decode_splitk: needs 1 <= L <= {MAX_DECODE_QUERIES} queries; got q "
                         f"{tuple(q.shape)}; use fxport::sdpa for longer chunks")


def _tail_causal_mask(q, k, attn_mask, valid_len):
    """attn_mask combined with the bottom-right causal rule (query i of L attends keys
    j <= n - L + i, n = valid_len[b] or S) as a bool/additive mask (B or 1, 1 or H_q, L, S)."""
    L, S = q.shape[2], k.shape[2]
    n = torch.full((1,), S, dtype=torch.int64, device=q.device) if valid_len is None else \
        valid_len.reshape(-1).to(torch.int64).clamp(0, S)
    j = torch.arange(S, device=q.device).view(1, 1, 1, S)
    i = torch.arange(L, device=q.device).view(1, 1, L, 1)
    keep = j <= n.view(-1, 1, 1, 1) - L + i  # (B or 1, 1, L, S)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


@sdpa_decode_splitk.register_fake
def _sdpa_decode_splitk_fake(q, k, v, attn_mask, valid_len, scale, causal=False):
    check_attention_inputs("fxport::sdpa_decode_splitk", q, k, v, attn_mask, valid_len)
    _check_decode(q)
    return torch.empty_like(q)


@sdpa_decode_splitk.register_kernel("cpu")
def _sdpa_decode_splitk_cpu(q, k, v, attn_mask, valid_len, scale, causal=False):
    check_attention_inputs("fxport::sdpa_decode_splitk", q, k, v, attn_mask, valid_len)
    _check_decode(q)
    if causal:
        attn_mask = _tail_causal_mask(q, k, attn_mask, valid_len)
    return _like_q(q, reference_sdpa(q, k, v, attn_mask, valid_len, scale))
