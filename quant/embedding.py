"""Quantized embedding lookup that ExecuTorch runs: ``quantized_decomposed.embedding_byte`` /
``embedding_4bit`` (the kernels in ``executorch.kernels.quantized``; import that module before
loading a ``.pte`` holding them).

:class:`QuantizedEmbedding` replaces a (scaled) ``nn.Embedding`` module in eager, so the
exported program carries the quantized op directly (no graph rewrite):

* 8 bits: int8 codes ``q`` in [-127, 127], ``w = scale * q``; one scale per group of
  ``group_size`` columns (None: per row), symmetric (no zero point).
* 4 bits: codes in [-8, 7] packed two per byte (``uint8``: first column in the high nibble, as
  ExecuTorch's kernel unpacks ``byte // 16`` then ``byte % 16``, each offset by 8),
  asymmetric: ``w = scale * (q - zero)`` with a float zero point per group (min-max over the
  group: the group's min and max are exact up to fp16 rounding of scale and zero).

:meth:`QuantizedEmbedding.from_int8_linear` builds the lookup from an int8 per-channel linear
whose weight is the table (a tied head quantized by torchao): the lookup reads the linear's own
codes and scales (the same tensors), so a program that stores its weights in a data file
(:func:`fxport.lowering.xnnpack.lower_to_xnnpack`) holds the table once. Codes in [-128, 127]
(torchao's symmetric int8), fp32 scales. When the head's columns were scaled (activation
smoothing folds ``s`` into them), ``column_scale = 1 / s`` undoes it after the lookup: one
``(dim,)`` multiply per looked-up row.

Scales are stored in fp16 for 8 bits (2 bytes per group) and fp32 with fp32 zero points for 4
bits: ExecuTorch's ``embedding_4bit`` kernel (executorch 1.5.1) insists that zero points have
the output's dtype, and with fp16 scales and no zero points it returned wrong rows (measured:
max error 5.8 on a N(0, 1) table) where eager was right. The module casts the lookup to
float32 before the embedding scale (``sqrt(hidden)`` in Gemma), as
:class:`fxport.models.gemma4.model.ScaledEmbedding` does.
Lookup error vs the float table: at most half a step per element plus the fp16 rounding of
scale/zero (tests assert it).
"""

from __future__ import annotations

import torch
from torch import nn


def _register_ops() -> None:
    """The quantized_decomposed embedding ops' Python definitions (eager and export)."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401


class QuantizedEmbedding(nn.Module):
    """Lookup from a quantized table; ``forward(ids) -> float32 (..., dim) * embed_scale``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, embed_scale: float | None, num_embeddings: int, embedding_dim: int):
        super().__init__()
        _register_ops()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedEmbedding: bits must be 4 or 8, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.embed_scale = embed_scale
        self.quant_min = -8 if bits == 4 else -127
        self.quant_max = 7 if bits == 4 else 127
        self.register_buffer("column_scale", None)  # (dim,) applied after the lookup (from_int8_linear)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int = 4, group_size: int | None = 32) -> "QuantizedEmbedding":
        """Quantize ``emb.weight`` (see the module docstring for the formats)."""
        scale_dtype = torch.float16 if bits == 8 else torch.float32
        w = emb.weight.detach().float()
        n, k = w.shape
        g = k if group_size is None else group_size
        if k % g:
            raise ValueError(f"QuantizedEmbedding: group_size {group_size} does not divide embedding_dim {k}; "
                             "pick a divisor or None (per row)")
        wg = w.reshape(n, k // g, g)
        if bits == 8:
            scales = (wg.abs().amax(-1) / 127).clamp_min(1e-12).to(scale_dtype)
            q = (wg / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
            codes, zeros = q, None
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            scales = ((hi - lo) / 15).clamp_min(1e-12).to(scale_dtype)
            s = scales.float()
            # w = s * (q - z), q in [-8, 7]: lo -> -8, so z = -8 - lo / s
            zeros = (-8 - lo / s).to(scale_dtype)
            q = (wg / s[..., None] + zeros.float()[..., None]).round().clamp(-8, 7).to(torch.int16).reshape(n, k)
            u = (q + 8).to(torch.uint8)
            codes = (u[:, 0::2] << 4) | u[:, 1::2]
        if group_size is None:
            scales = scales.reshape(n)
            zeros = None if zeros is None else zeros.reshape(n)
        embed_scale = getattr(emb, "embed_scale", None)
        embed_scale = None if embed_scale is None else float(embed_scale)
        return cls(codes.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
                   bits, g, embed_scale, n, k)

    @classmethod
    def from_int8_linear(cls, weight: torch.Tensor, embed_scale: float | None = None,
                         column_scale: torch.Tensor | None = None) -> "QuantizedEmbedding":
        """The lookup of a table quantized as an int8 per-channel linear (torchao's
        ``IntxUnpackedToInt8Tensor`` of a tied head: ``w[r] = scale[r] * q[r]``, zero points 0),
        each looked-up row multiplied by ``column_scale`` (``(dim,)``, e.g. ``1 / s`` of the head's
        smoothing) when given.

        The codes and scales are the linear's own tensors, not copies. Raises ValueError for any
        other weight (not int8, not per row, or with non-zero zero points).
        """
        qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
        if qdata is None or scale is None or qdata.dtype != torch.int8 or qdata.dim() != 2:
            raise ValueError("QuantizedEmbedding.from_int8_linear: the weight is not an int8 quantized tensor "
                             f"(got {type(weight).__name__}); quantize the head with an int8 per-channel rule first")
        n, k = qdata.shape
        if scale.numel() != n:
            raise ValueError(f"QuantizedEmbedding.from_int8_linear: {scale.numel()} scales for {n} rows; "
                             "the head must be int8 per channel (one scale per row)")
        zero = getattr(weight, "zero_point", None)
        if zero is not None and bool(zero.ne(0).any()):
            raise ValueError("QuantizedEmbedding.from_int8_linear: the head's int8 codes have non-zero zero points; "
                             "the lookup supports symmetric int8 only")
        scales = scale.reshape(n)
        if scales.dtype != torch.float32:
            scales = scales.float()
        q = cls(qdata, scales, None, 8, k, embed_scale, n, k)
        q.quant_min = -128
        if column_scale is not None:
            if tuple(column_scale.shape) != (k,):
                raise ValueError(f"QuantizedEmbedding.from_int8_linear: column_scale has shape "
                                 f"{tuple(column_scale.shape)}, expected ({k},)")
            q.column_scale = column_scale.detach().float().contiguous()
        return q

    def dequantized(self) -> torch.Tensor:
        """The float32 table this module looks up (without the embedding scale)."""
        out = self._lookup(torch.arange(self.num_embeddings))
        return out if self.column_scale is None else out * self.column_scale

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            out = torch.ops.quantized_decomposed.embedding_byte.default(
                self.codes, self.scales, self.zeros, self.quant_min, self.quant_max, ids)
        else:
            out = torch.ops.quantized_decomposed.embedding_4bit.default(
                self.codes, self.scales, self.zeros, self.quant_min, self.quant_max, ids)
        return out.to(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids)
        if self.column_scale is not None:
            out = out * self.column_scale
        return out if self.embed_scale is None else out * self.embed_scale

    def nbytes(self) -> int:
        """Stored bytes: codes + scales (+ zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros) if t is not None)

    def row_bytes(self) -> int:
        """Bytes one lookup reads: one row of codes and its scales (+ zero points)."""
        return self.nbytes() // self.num_embeddings

    def extra_repr(self) -> str:
        g = "per-row" if self.group_size == self.embedding_dim else f"g{self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} {g}, {self.nbytes() / 2**20:.1f} MiB"


def quantize_embedding(model: nn.Module, fqn: str, bits: int = 4, group_size: int | None = 32) -> QuantizedEmbedding:
    """Swap the embedding module at ``fqn`` (e.g. ``model.embed_tokens``) for a QuantizedEmbedding.

    A linear sharing the embedding's weight (a tied head) keeps its own reference to the float
    weight; quantize or untie it first if the float table should leave the program.
    """
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    emb = getattr(parent, child)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"quantize_embedding: {fqn} is a {type(emb).__name__}, not an nn.Embedding")
    q = QuantizedEmbedding.from_embedding(emb, bits, group_size)
    setattr(parent, child, q)
    return q
