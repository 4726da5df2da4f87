"""The GGUF reader: a llama.cpp ``.gguf`` file -> metadata and raw tensors, nothing dequantized.

:func:`read_gguf` parses the header (metadata and tensor table, with the ``gguf`` package's enums
and block sizes; same result as ``gguf.GGUFReader``, which takes 10-30 s on Gemma's
262144-token vocabulary against ~1 s here) and memory-maps every tensor's bytes
(:class:`GGUFTensor`: ggml type, PyTorch-order shape, the raw array). Decoding a block format is
``gguf.quants.dequantize`` (:meth:`GGUFTensor.dequantize`); repacking one is
:mod:`fxport.quant.gguf_import`; turning a file into a model's config and state dict is
:func:`fxport.models.gemma4.load.load_gguf`.

Tensor names: :func:`gguf_to_hf_name` maps llama.cpp's Gemma names (``blk.3.attn_q.weight``) to
transformers' (``model.layers.3.self_attn.q_proj.weight``). The table is a fact of the file
format for its architecture (the ``gguf`` package keeps such tables too), not model code, so it
lives with the reader: the model loader and the quantized import both name tensors through it.

Every failure (a missing, truncated or foreign file, an unknown value or ggml type) raises
:class:`~fxport.weights.errors.CheckpointError` naming the file and the fix. A file is GGUF when
it starts with the GGUF magic bytes, whatever its name (Ollama stores GGUF blobs without a suffix).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from fxport.weights.errors import CheckpointError, require_exists

__all__ = [
    "GGUF_MAGIC",
    "GGUF_GLOBAL_NAMES",
    "GGUF_LAYER_NAMES",
    "GGUFTensor",
    "GGUFFile",
    "is_gguf_file",
    "gguf_to_hf_name",
    "read_gguf",
    "read_gguf_with_reader",
    "read_gguf_metadata",
    "iter_gguf_tensors",
]

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file starting with the GGUF magic bytes (any name, any suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """transformers name of a Gemma GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None if the name is not a Gemma tensor."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.match(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, not dequantized.

    ``shape`` is in PyTorch order (GGUF lists the fastest dimension first; this is reversed),
    ``data`` the raw memory-mapped array the ``gguf`` reader exposes: for block formats uint8
    of shape (rows, bytes_per_row), for F32/F16 the typed values. ``hf_name`` is None for
    tensors that have no transformers counterpart.
    """

    name: str
    hf_name: str | None
    ggml_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize(self) -> np.ndarray:
        """fp32 values of shape ``self.shape`` through ``gguf.quants.dequantize``."""
        from gguf.quants import dequantize

        return dequantize(self.data, self.ggml_type).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class GGUFFile(NamedTuple):
    """A parsed GGUF file: metadata (Python values; arrays as lists) and raw tensors."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads from a memory-mapped GGUF header; EOF -> CheckpointError."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.mv, self.pos, self.path = buf, memoryview(buf), 0, path

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path} ({len(self.buf)} bytes) is truncated: the header ends inside "
                f"{what} at byte {self.pos}. Re-download or re-assemble the file."
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.mv, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self._need(n, what)
        s = bytes(self.mv[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def array(self, dtype: Any, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self._need(n, what)
        a = np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=self.pos)
        self.pos += n
        return a


# GGUFValueType -> struct format of a scalar / numpy dtype of an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}
_GGUF_ARRAYS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _GGUF_SCALARS:
        v = cur.scalar(_GGUF_SCALARS[vtype], key)
        return float(v) if vtype in (6, 12) else v
    if vtype == 8:
        return cur.string(key)
    if vtype == 9:
        etype, count = cur.scalar("I", key), cur.scalar("Q", key)
        if etype in _GGUF_ARRAYS:
            return cur.array(_GGUF_ARRAYS[etype], count, key).tolist()
        return [_read_value(cur, etype, key) for _ in range(count)]
    raise CheckpointError(f"{cur.path}: metadata key {key!r} has unknown value type {vtype}; the "
                          "file is corrupt or from a newer GGUF version.")


def _tensor_data(buf: np.ndarray, offset: int, ggml_type: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The raw array ``gguf.GGUFReader`` would expose for a tensor (same dtype and shape)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quant_shape_to_byte_shape

    plain = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
             Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}
    n = int(np.prod(shape))
    if ggml_type in plain:
        return np.frombuffer(buf, dtype=plain[ggml_type], count=n, offset=offset).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    byte_shape = quant_shape_to_byte_shape(shape, ggml_type)
    return np.frombuffer(buf, dtype=np.uint8, count=n // block * type_size, offset=offset).reshape(byte_shape)


def _tensor_nbytes(ggml_type: Any, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * type_size


def _check_file(path: Path) -> int:
    require_exists(
        path, "GGUF file",
        "Pass the path of a .gguf file (the Gemma 3 270M test file: "
        "fxport.models.gemma4.load.gemma3_270m_gguf()).",
    )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); pass a "
            "llama.cpp .gguf file."
        )
    return path.stat().st_size


def _check_tensors(path: Path, size: int, tensors: list[GGUFTensor], offsets: list[int]) -> None:
    for t, off in zip(tensors, offsets):
        end = off + _tensor_nbytes(t.ggml_type, t.shape)
        if end > size:
            raise CheckpointError(
                f"{path} ({size} bytes) is truncated: tensor {t.name!r} ends at byte {end}. "
                "Re-download or re-assemble the file."
            )


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file (v2/v3, little-endian): metadata and memory-mapped raw tensors.

    The header is parsed here with bulk numpy reads because ``gguf.GGUFReader`` builds one
    numpy view per array element, which takes 10-30 s on a 262144-token vocabulary; the
    result is the same (checked against ``GGUFReader`` in the tests, see
    :func:`read_gguf_with_reader`). Tensor bytes are never decoded here: dequantization is
    ``gguf.quants.dequantize``.
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    size = _check_file(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3, "
                              "little-endian); re-convert with a current llama.cpp.")
    n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the key count")
    md: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        md[key] = _read_value(cur, cur.scalar("I", key), key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("I", name)
        dims = [cur.scalar("Q", name) for _ in range(n_dims)]
        raw_type, offset = cur.scalar("I", name), cur.scalar("Q", name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}; "
                                  "update the gguf package or re-convert the file.") from None
        infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
    align = int(md.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    offsets = [data_start + off for *_, off in infos]
    shells = [GGUFTensor(n, gguf_to_hf_name(n), ty, shp, np.empty(0)) for n, shp, ty, _ in infos]
    _check_tensors(path, size, shells, offsets)
    tensors = [
        GGUFTensor(n, gguf_to_hf_name(n), ty, shp, _tensor_data(buf, off, ty, shp))
        for (n, shp, ty, _), off in zip(infos, offsets)
    ]
    return GGUFFile(path, md, tensors)


def read_gguf_with_reader(path: str | os.PathLike) -> GGUFFile:
    """:func:`read_gguf` through ``gguf.GGUFReader`` (slow on large vocabularies; the
    reference the fast parser is tested against)."""
    import gguf

    path = Path(path)
    size = _check_file(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on cut files
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: the gguf reader failed with "
            f"{type(e).__name__}: {e}. Re-download or re-assemble the file."
        ) from None
    md = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [
        GGUFTensor(t.name, gguf_to_hf_name(t.name), t.tensor_type,
                   tuple(int(d) for d in reversed(t.shape.tolist())), t.data)
        for t in reader.tensors
    ]
    return GGUFFile(path, md, tensors)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as Python values (arrays as lists)."""
    return read_gguf(path).metadata


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[GGUFTensor]:
    """Every tensor of a GGUF file, raw (ggml type + block bytes), in file order.

    For code that repacks quantized weights itself: nothing is dequantized and nothing is
    renamed except ``hf_name``. The arrays are read-only memory-mapped views of the file.
    """
    yield from read_gguf(path).tensors
