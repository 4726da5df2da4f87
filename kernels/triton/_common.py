"""Code shared by the Triton attention kernels (:mod:`.sdpa`, :mod:`.sdpa_decode_splitk`).

Device side: :func:`_attend_block`, one step of the online softmax over a block of keys.
Host side: normalization of the optional mask / valid_len arguments into (constexpr kind,
tensor, strides), the ``tl.dot`` precision for a dtype, and the launch through ``wrap_triton``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2  # the kernels' MASK_KIND constexpr


@triton.jit
def _attend_block(q, k_ptrs, v_ptrs, kv_ok, keep, m_ptrs, m_i, l_i, acc, scale,
                  MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of BLOCK_N keys into the running (max ``m_i``, sum ``l_i``, ``acc``) of
    BLOCK_R query rows and return the new ``(m_i, l_i, acc)``.

    q (BLOCK_R, BLOCK_D); k_ptrs, v_ptrs (BLOCK_N, BLOCK_D) with load mask kv_ok; keep
    (BLOCK_R, BLOCK_N) bool: the pairs that may attend (row/key bounds, causal, window);
    m_ptrs (BLOCK_R, BLOCK_N) into the mask, read only where keep (MASK_KIND 1: bool, True =
    attend; 2: additive float; 0: none, not read). True online softmax in fp32: exponents are
    ``exp(s - m)`` with m the running max; a row without any key so far keeps m = -inf, l = 0.
    """
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_N) fp32
    if MASK_KIND != 0:
        if MASK_KIND == 1:
            keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
        else:
            s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp(-inf - 0) = 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def mask_args(attn_mask: Optional[torch.Tensor], B: int, H_q: int, L: int, S: int, dummy: torch.Tensor):
    """(kind, tensor, strides (b, h, l, s)) of a mask broadcast to (B, H_q, L, S).

    The mask is passed as it is (no expand/copy: a view op in front of a kernel would be
    functionalized as a write-back under tracing); broadcast dims get stride 0.
    """
    if attn_mask is None:
        return MASK_NONE, dummy, (0, 0, 0, 0)
    m = attn_mask
    pad = 4 - m.dim()
    sizes = [1] * pad + list(m.shape)
    strides = [0] * pad + list(m.stride())
    for i, (size, want) in enumerate(zip(sizes, (B, H_q, L, S))):
        if isinstance(size, int) and size == 1:
            strides[i] = 0
        elif isinstance(size, int) and isinstance(want, int) and size != want:
            raise ValueError(f"attn_mask of shape {tuple(m.shape)} does not broadcast to {(B, H_q, L, S)}")
    kind = MASK_BOOL if m.dtype == torch.bool else MASK_ADD
    return kind, m, tuple(strides)


def valid_len_args(valid_len: Optional[torch.Tensor], B: int, dummy: torch.Tensor):
    """(has_valid_len, tensor, batch stride) of valid_len None, (), (1,) or (B,) (int32/int64 kept,
    other dtypes cast to int32); ``dummy`` stands in for a missing tensor."""
    if valid_len is None:
        return False, dummy, 0
    n = valid_len.numel()
    if n != 1 and n != B:
        raise ValueError(f"valid_len must have 1 or B={B} entries; got shape {tuple(valid_len.shape)}")
    vl = valid_len if valid_len.dtype in (torch.int32, torch.int64) else valid_len.to(torch.int32)
    # read in the kernel as ValidLen[b * stride]: () and (1,) -> stride 0
    return True, vl, (0 if n == 1 else vl.stride(-1))


def launch(kernel, grid, args: tuple, kwargs: dict, warmup: bool):
    """Launch ``kernel`` through ``wrap_triton`` (traceable by export/AOTInductor), or with
    ``warmup`` only compile it for the current driver's target and return the compiled kernel
    (used by ``bench/sdpa.py`` to check registers/spills/shared memory without a GPU)."""
    if warmup:
        return kernel.warmup(*args, grid=grid, **kwargs)
    wrap_triton(kernel)[grid](*args, **kwargs)
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` for inputs of ``dtype``."""
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact products (no TF32)
