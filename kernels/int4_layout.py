"""The int4 layout the kernels read: nibble order and the dequantization formula.

    w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
    packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)        # (N, K // 2) uint8, low nibble = even k

Why here: the kernels are the bottom floor of fxport. They define the bytes they read and import
nothing of fxport, and :mod:`fxport.quant` (the producers: min-max, HQQ, GGUF import, the
safetensors format in :mod:`fxport.quant.packed`) imports this layout from them. The arrow runs
one way, ``quant -> kernels``: ``quant.linear`` needs the ops of :mod:`fxport.kernels.int4_ops`
registered, and those ops' CPU references need these two functions, which lived in
``quant.packed`` and so made a circle. The writer :func:`fxport.quant.packed.pack_int4` stays in
``quant`` with the format's error class (it validates user codes); its inverse is here.
"""

from __future__ import annotations

import torch

__all__ = ["unpack_int4", "dequantize_codes"]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes in [0, 15] (inverse of :func:`fxport.quant.packed.pack_int4`)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reference formula: (N, K) codes -> ``((q - z) * s).to(dtype)``, per group along K.

    Arithmetic is done in ``dtype`` (like torchao's ``dequantize_affine``), so integer zeros
    give results bit-identical to it.
    """
    dtype = dtype or scales.dtype
    n, k = codes.shape
    q = codes.to(dtype).reshape(n, k // group_size, group_size)
    w = (q - zeros.to(dtype)[..., None]) * scales[..., None]
    return w.reshape(n, k).to(dtype)
