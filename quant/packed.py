"""The canonical quantized weight: nibble-packed codes + per-group scales and zeros.

One format for every producer (min-max, HQQ, torchao's int4 graphs, GGUF import) and every
consumer (the Triton GEMV / dequant kernels, their CPU reference impls, safetensors files):

    w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

* ``q`` are unsigned codes in ``[0, 2**bits - 1]``. For ``bits == 4`` two codes share a byte:
  ``packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)`` (low nibble = even column), so ``packed``
  is ``(N, K // 2)`` uint8 and a row of the weight is contiguous. For ``bits == 8`` ``packed``
  is the ``(N, K)`` uint8 codes themselves.
* ``scales`` and ``zeros`` are ``(N, K // group_size)`` floating tensors of the same dtype.
  Zeros live in the code domain and may be fractional (HQQ); integer zeros (min-max, torchao)
  are exact. A symmetric int4 quantizer has ``zeros == 8``.

Files: :func:`save_quantized` / :func:`load_quantized` store a ``{name: QuantizedWeight}``
dict (plus optional dense tensors) in one safetensors file whose metadata carries the format
name and version; a wrong format, an unsupported version or a tensor that does not agree with
its recorded layout raises :class:`QuantFormatError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

# the layout the kernels read, defined with them (quant -> kernels, one way; see that module)
from fxport.kernels.int4_layout import dequantize_codes, unpack_int4

FORMAT_NAME = "fxport.quant.packed"
FORMAT_VERSION = 1


class QuantFormatError(ValueError):
    """A quantized weight or file does not follow the canonical format."""


# ----------------------------------------------------------------------------- nibbles


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] (any integer dtype) -> (N, K // 2) uint8, low nibble = even k
    (the layout of :mod:`fxport.kernels.int4_layout`; :func:`unpack_int4` is its inverse)."""
    if q.dim() != 2 or q.shape[-1] % 2:
        raise QuantFormatError(f"pack_int4: expected (N, K) codes with K even, got shape {tuple(q.shape)}")
    q = q.to(torch.int16)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise QuantFormatError(
            f"pack_int4: codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]; "
            "shift signed int4 codes by +8 first"
        )
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


# ----------------------------------------------------------------------------- the weight


@dataclass
class QuantizedWeight:
    """A weight in canonical form. See the module docstring for the formula and layouts.

    shape: (N, K) of the dense weight (out_features, in_features).
    """

    packed: torch.Tensor  # (N, K // 2) uint8 for 4 bits, (N, K) uint8 for 8 bits
    scales: torch.Tensor  # (N, K // group_size) float
    zeros: torch.Tensor  # (N, K // group_size) float, same dtype as scales
    group_size: int
    bits: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    def validate(self, name: str = "QuantizedWeight") -> None:
        """Raise :class:`QuantFormatError` if the tensors do not match the declared layout."""
        if self.bits not in (4, 8):
            raise QuantFormatError(f"{name}: bits must be 4 or 8, got {self.bits}")
        if len(self.shape) != 2:
            raise QuantFormatError(f"{name}: shape must be (N, K), got {self.shape}")
        n, k = self.shape
        g = self.group_size
        if g <= 0 or k % g or (self.bits == 4 and g % 2):
            raise QuantFormatError(
                f"{name}: group_size {g} must be positive{', even' if self.bits == 4 else ''} "
                f"and divide K = {k}"
            )
        packed_shape = (n, k // 2) if self.bits == 4 else (n, k)
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != packed_shape:
            raise QuantFormatError(
                f"{name}: packed must be uint8 of shape {packed_shape} for {self.bits}-bit "
                f"(N, K) = {self.shape}, got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        group_shape = (n, k // g)
        for what, t in (("scales", self.scales), ("zeros", self.zeros)):
            if not t.is_floating_point() or tuple(t.shape) != group_shape:
                raise QuantFormatError(
                    f"{name}: {what} must be floating of shape {group_shape}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        if self.scales.dtype != self.zeros.dtype:
            raise QuantFormatError(
                f"{name}: scales ({self.scales.dtype}) and zeros ({self.zeros.dtype}) must share a dtype"
            )

    @property
    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes."""
        return unpack_int4(self.packed) if self.bits == 4 else self.packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) dense weight; computed as ``(q - z) * s`` in ``dtype`` (default: scales')."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))


# ----------------------------------------------------------------------------- files


def _tensor_names(name: str) -> dict[str, str]:
    return {part: f"{name}.{part}" for part in ("packed", "scales", "zeros")}


def save_quantized(
    path: str | os.PathLike,
    weights: dict[str, QuantizedWeight],
    dense: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write quantized weights (and optional dense tensors) to one safetensors file.

    Tensor names: ``<name>.packed``, ``<name>.scales``, ``<name>.zeros`` per quantized weight
    and ``<name>`` per dense tensor. The metadata holds ``format``, ``format_version`` and a
    JSON ``layout`` with each quantized weight's bits, group size and shape.
    """
    from safetensors.torch import save_file

    dense = dense or {}
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, qw in weights.items():
        qw.validate(name)
        for part, tname in _tensor_names(name).items():
            tensors[tname] = getattr(qw, part).contiguous().cpu()
        layout[name] = {"bits": qw.bits, "group_size": qw.group_size, "shape": list(qw.shape)}
    for name, t in dense.items():
        if name in tensors:
            raise QuantFormatError(f"save_quantized: dense tensor {name!r} collides with a quantized weight part")
        tensors[name] = t.contiguous().cpu()
    metadata = dict(extra_metadata or {})
    metadata.update(
        format=FORMAT_NAME,
        format_version=str(FORMAT_VERSION),
        layout=json.dumps(layout, sort_keys=True),
        dense=json.dumps(sorted(dense)),
    )
    from fxport.fileio import atomic_path

    with atomic_path(path) as tmp:  # a failed or interrupted save keeps the previous file
        save_file(tensors, os.fspath(tmp), metadata=metadata)


def load_quantized(
    path: str | os.PathLike, device: str = "cpu"
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_quantized` -> (quantized weights, dense, metadata)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        f_ctx = safe_open(path, framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise QuantFormatError(f"{path}: not a readable safetensors file ({e})") from e
    with f_ctx as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise QuantFormatError(
                f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}; "
                "write it with fxport.quant.save_quantized"
            )
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise QuantFormatError(
                f"{path}: format_version {version!r} is not supported by this fxport "
                f"(reads version {FORMAT_VERSION}); re-quantize or upgrade fxport"
            )
        try:
            layout = json.loads(meta["layout"])
            dense_names = json.loads(meta.get("dense", "[]"))
        except (KeyError, json.JSONDecodeError) as e:
            raise QuantFormatError(f"{path}: corrupt layout metadata ({e})") from e
        if not isinstance(layout, dict):
            raise QuantFormatError(
                f"{path}: corrupt layout metadata (a JSON {type(layout).__name__}, expected an object of "
                "weight name -> {bits, group_size, shape}); re-write it with fxport.quant.save_quantized"
            )
        if not isinstance(dense_names, list) or not all(isinstance(d, str) for d in dense_names):
            raise QuantFormatError(
                f"{path}: corrupt dense metadata ({meta.get('dense')!r}, expected a JSON list of tensor "
                "names); re-write it with fxport.quant.save_quantized"
            )
        keys = set(f.keys())
        weights: dict[str, QuantizedWeight] = {}
        for name, info in layout.items():
            names = _tensor_names(name)
            missing = [t for t in names.values() if t not in keys]
            if missing:
                raise QuantFormatError(f"{path}: quantized weight {name!r} is missing tensors {missing}")
            qw = QuantizedWeight.__new__(QuantizedWeight)  # validated below, with the file in the message
            qw.__dict__.update({part: f.get_tensor(t) for part, t in names.items()})
            try:
                if not isinstance(info, dict):
                    raise TypeError(f"a JSON {type(info).__name__}, expected an object")
                qw.group_size, qw.bits = int(info["group_size"]), int(info["bits"])
                qw.shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise QuantFormatError(f"{path}: corrupt layout entry for {name!r}: {info!r}") from e
            qw.validate(f"{path}: {name}")
            weights[name] = qw
        missing = [d for d in dense_names if d not in keys]
        if missing:
            raise QuantFormatError(f"{path}: dense tensors {missing} listed in metadata are missing")
        dense = {d: f.get_tensor(d) for d in dense_names}
    return weights, dense, meta
