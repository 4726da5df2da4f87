"""fxport's own quantized linear: canonical int4 buffers + dequant + ``F.linear``.

:class:`QuantizedLinear` holds ``weight_packed`` (N, K/2) uint8, ``weight_scales`` and
``weight_zeros`` (N, K/g) as buffers, and computes
``F.linear(x, fxport::int4_dequant(packed, scales, zeros, g, x.dtype), bias)`` in eager. It
exports as exactly that pattern (``int4_dequant`` + ``linear`` over buffers named
``<module>.weight_packed`` ...), which :class:`fxport.passes.int4_dispatch.Int4Dispatch`
recognises: decode programs get the GEMV on the same buffers, prefill keeps dequant + mm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxport.kernels.int4_ops  # noqa: F401  (registers torch.ops.fxport.int4_*)
from fxport.quant.packed import QuantizedWeight


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is canonical int4 (4-bit only)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if qweight.bits != 4:
            raise ValueError(f"QuantizedLinear: only 4-bit weights are supported, got {qweight.bits}-bit")
        self.out_features, self.in_features = qweight.shape
        self.group_size = qweight.group_size
        self.register_buffer("weight_packed", qweight.packed)  # (N, K // 2) uint8
        self.register_buffer("weight_scales", qweight.scales)  # (N, K // g)
        self.register_buffer("weight_zeros", qweight.zeros)  # (N, K // g)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.weight_packed, self.weight_scales, self.weight_zeros, self.group_size, 4, (self.out_features, self.in_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ops.fxport.int4_dequant(self.weight_packed, self.weight_scales, self.weight_zeros, self.group_size, x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, bias={self.bias is not None}"


def to_quantized_linears(model: nn.Module, weights: dict[str, QuantizedWeight]) -> list[str]:
    """Swap every nn.Linear whose ``<fqn>.weight`` has a 4-bit entry in ``weights`` for a
    :class:`QuantizedLinear`; returns the swapped module FQNs. Other entries are ignored."""
    swapped = []
    for name, mod in list(model.named_modules()):
        qw = weights.get(f"{name}.weight")
        if not isinstance(mod, nn.Linear) or qw is None or qw.bits != 4:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear(qw, mod.bias))
        swapped.append(name)
    return swapped
