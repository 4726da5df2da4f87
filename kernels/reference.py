"""An fp64 attention reference, independent of the ``fxport::`` ops and kernels.

Used by the kernel/op tests (CPU reference impls and the Triton kernels under
``TRITON_INTERPRET=1``) as the ground truth: an explicit softmax over gathered KV heads,
written without ``F.scaled_dot_product_attention`` and without
:func:`fxport.kernels.attention_ops.reference_sdpa`.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["attention_fp64"]


def attention_fp64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    valid_len: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float64; query head h reads KV head h // n_rep.

    q (B, H_q, L, D); k, v (B, H_kv, S, D); mask bool (True = attend) or additive float,
    broadcastable to (B, H_q, L, S); valid_len None or (), (1,), (B,): keys >= valid_len[b]
    excluded; is_causal: key j attends to query i iff j <= i; window > 0: also i - j < window.
    -> (B, H_q, L, D) float64; a query row without any attended key is 0. CPU tensors.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H_q, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    heads = torch.arange(H_q) // (H_q // H_kv)
    k, v = k[:, heads], v[:, heads]  # (B, H_q, S, D)
    s = torch.einsum("bhld,bhsd->bhls", q, k) * scale
    keep = torch.ones(B, H_q, L, S, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.double()
            keep = keep & (mask > float("-inf"))
    if valid_len is not None:
        keep = keep & (torch.arange(S).view(1, 1, 1, S) < valid_len.reshape(-1, 1, 1, 1))
    i, j = torch.arange(L).view(L, 1), torch.arange(S).view(1, S)
    if is_causal:
        keep = keep & (j <= i)
    if window:
        keep = keep & (i - j < window)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)  # fully masked rows: m = -inf -> finite
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return torch.einsum("bhls,bhsd->bhld", p, v) / torch.where(denom == 0, 1.0, denom)
