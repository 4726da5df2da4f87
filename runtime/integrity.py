"""Is this ``.ptd`` the weights file of this ``.pte``, and intact? Checked before a program runs.

A ``.pte`` with a weights file reads its constants from the ``.ptd`` by key; ExecuTorch checks
neither that the file is the one the program was exported with nor that its bytes are intact, so
a damaged or foreign ``.ptd`` runs and prints garbage (or fails with "Failed to get constant data
for key ..."). :func:`check_weights` refuses both with one line naming the two files.

Where the expected digest comes from:

1. A program published by :func:`fxport.fileio.write_program` resolves to a generation folder
   that holds ``program.json``: the size and sha256 of the ``.pte`` and of its ``.ptd``,
   recorded at save time and published with the pair by the same rename. The ``.ptd`` given (the
   one beside the program, or any other) must have the recorded digest; the ``.pte`` too.
2. A pair without that record (copied elsewhere, or from an earlier fxport) is checked with what
   the files say themselves: the ``.ptd`` must be an ExecuTorch weights file (``FT01``) that is
   not truncated; every key it holds must be one the ``.pte`` names (another export's weights
   carry keys this program does not know); and the blobs XNNPACK keys by the sha256 of their
   bytes (all its weights and scales: 99% of the bytes of the 270M ``balanced`` ``.ptd``) must
   hash to their key.

Cost: one sha256 pass over the ``.ptd`` (~1.5 GB/s here; 0.17 s for the 270 MB of the 270M
``balanced`` program, whose load reads the same bytes anyway). ``FXPORT_CHECK_WEIGHTS=0`` (or
``fxport run|bench|demo --no-weights-check``) skips it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["WeightsMismatchError", "check_weights", "enabled"]

_CONTENT_KEY = re.compile(r"^(?:scale_)?([0-9a-f]{64})$")  # XNNPACK's named data: sha256 of the bytes
_FIX = "pass the .ptd exported with this program, or re-export it (FXPORT_CHECK_WEIGHTS=0 skips this check)"


class WeightsMismatchError(ValueError):
    """The ``.ptd`` is damaged or belongs to another program; the message names both files."""


def enabled() -> bool:
    """False when ``FXPORT_CHECK_WEIGHTS`` is ``0`` / ``off`` / ``false`` / ``no``."""
    return os.environ.get("FXPORT_CHECK_WEIGHTS", "1").strip().lower() not in ("0", "off", "false", "no")


def _refuse(weights: Path, program: Path, why: str) -> WeightsMismatchError:
    return WeightsMismatchError(f"{weights} does not belong to {program} or is damaged: {why}; {_FIX}")


def check_weights(program: PathLike, weights: PathLike | None) -> None:
    """Raise :class:`WeightsMismatchError` unless ``weights`` is ``program``'s intact weights file
    (see the module docstring); nothing to check without a weights file or when disabled."""
    if weights is None or not enabled():
        return
    program, weights = Path(program), Path(weights)
    from fxport.fileio import read_record, sha256_file

    shown = Path(program).with_suffix(".ptd")  # name the file as the user sees it: x.ptd, not x.fxport/g-.../x.ptd
    if shown != weights and shown.is_file() and weights.is_file() and os.path.samefile(shown, weights):
        weights = shown

    record = read_record(program)
    if record is not None:
        files = record["files"]
        mine = files.get(Path(os.path.realpath(program)).name)
        if isinstance(mine, dict) and sha256_file(program) != mine.get("sha256"):
            raise WeightsMismatchError(f"{program} is damaged: its sha256 is not the one recorded when it was "
                                       f"exported; re-export it (FXPORT_CHECK_WEIGHTS=0 skips this check)")
        wanted = {v.get("sha256") for k, v in files.items() if k.endswith(".ptd") and isinstance(v, dict)}
        if wanted:
            if sha256_file(weights) not in wanted:
                raise _refuse(weights, program, "its sha256 is not the one recorded when the program was exported")
            return
    _check_by_content(program, weights)


def _read_flat_tensor(data) -> tuple[dict[str, int], list[tuple[str, int, int]]] | None:
    """``FlatTensor`` of a ``.ptd`` (``extension/flat_tensor/flat_tensor.fbs``), read in place:
    (the extended header's fields, [(key, offset from the file start, size)]). None when malformed."""
    import struct

    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    try:
        magic, length, fb_off, fb_size, seg_base, seg_size = struct.unpack_from("<4sIQQQQ", data, 8)
        if magic != b"FH01":
            return None
        buf = bytes(data[:fb_off + fb_size])
        root = Table(buf, N.UOffsetTFlags.py_type(struct.unpack_from("<I", buf, 0)[0]))

        def vector(table: Table, field: int) -> list[Table]:
            o = table.Offset(4 + 2 * field)
            if not o:
                return []
            start = table.Vector(o)
            return [Table(buf, table.Indirect(start + 4 * j)) for j in range(table.VectorLen(o))]

        def scalar(table: Table, field: int, flags) -> int:
            o = table.Offset(4 + 2 * field)
            return table.Get(flags, o + table.Pos) if o else 0

        segments = [(scalar(t, 0, N.Uint64Flags), scalar(t, 1, N.Uint64Flags)) for t in vector(root, 1)]
        named = []
        for t in vector(root, 2):
            o = t.Offset(4)
            key = t.String(o + t.Pos).decode() if o else ""
            offset, size = segments[scalar(t, 1, N.Uint32Flags)]
            named.append((key, seg_base + offset, size))
    except (struct.error, IndexError, UnicodeDecodeError, ValueError):
        return None
    return {"segment_base_offset": seg_base, "segment_data_size": seg_size}, named


def _check_by_content(program: Path, weights: Path) -> None:
    """The checks of a pair without a record (module docstring, 2.)."""
    with open(weights, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 64:
            raise _refuse(weights, program, f"it is {size} bytes, not an ExecuTorch weights file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[4:8] != b"FT01":
                raise _refuse(weights, program, "it is not an ExecuTorch weights file (no 'FT01' identifier at byte 4)")
            parsed = _read_flat_tensor(data)
            if parsed is None:
                raise _refuse(weights, program, "its header cannot be read")
            header, named = parsed
            end = header["segment_base_offset"] + header["segment_data_size"]
            if size < end:
                raise _refuse(weights, program, f"it is truncated ({size} of {end} bytes)")
            pte = Path(program).read_bytes()
            foreign = [key for key, _, _ in named if key.encode() not in pte]
            if foreign:
                raise _refuse(weights, program, f"it holds {len(foreign)} weight(s) the program does not use, "
                                                f"e.g. {foreign[0][:40]!r} (another export's weights)")
            checked: set[int] = set()
            for key, start, length in named:
                m = _CONTENT_KEY.match(key)
                if not m or start in checked:
                    continue
                if start + length > size or hashlib.sha256(data[start:start + length]).hexdigest() != m.group(1):
                    raise _refuse(weights, program, f"weight {key[:16]}... does not hash to its key (damaged bytes "
                                                    f"at offset {start})")
                checked.add(start)
