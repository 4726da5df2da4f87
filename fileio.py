"""Atomic output: a file fxport writes is either the complete new file or the previous one.

Every writer goes through a temporary file in the destination's own directory (so the final
``os.replace`` is a rename on one filesystem), flushed and ``fsync``-ed before the rename; the
directory is ``fsync``-ed after it. Any exception on the way -- a full disk (``ENOSPC``), a
writer that fails half way, ``KeyboardInterrupt`` -- removes the temporary and leaves the
previous file untouched.

    with atomic_file(out) as f:            # a file object
        f.write(buffer)
    with atomic_path(out) as tmp:           # a path, for writers that want one (safetensors, torch.export.save)
        save_file(tensors, tmp)
    write_program(out, buffer, sidecar=out.with_suffix(".tokenizer"), fill_sidecar=save_tokenizer)

:func:`check_writable_output` refuses a bad output path (a directory, a read-only directory, a
path through a file) before any work, with one message naming the path and the fix.

A directory (the ``<program>.tokenizer/`` sidecar) is built whole in a temporary directory and
swapped in with two renames (old aside, new in place); if the second rename fails the old one is
put back. :func:`write_program` prepares the sidecar and the program first and publishes them
last, so a failure while writing either leaves the previous pair as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TextIO, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "OutputPathError",
    "OutputWriteError",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "check_writable_output",
    "remove_tree",
    "staging_dir",
    "write_bytes",
    "write_program",
    "write_text",
]


class OutputPathError(ValueError):
    """An output path fxport cannot write to; the message names the path and the fix."""


class OutputWriteError(OSError):
    """Writing an output ran out of space (``ENOSPC`` / ``EDQUOT``); the previous file is intact."""


def _no_space(exc: BaseException, path: Path) -> BaseException:
    """``exc`` as an :class:`OutputWriteError` with the path and the fix when the disk is full."""
    if not is_no_space(exc) or isinstance(exc, OutputWriteError):
        return exc
    err = OutputWriteError(f"no space left on the device writing {path} ({exc.strerror or exc}); the previous "
                           f"file, if any, is unchanged: free some space or write to another disk")
    err.errno = exc.errno
    return err


# ----------------------------------------------------------------------------- checks


def check_writable_output(path: PathLike, *, what: str = "output") -> Path:
    """Refuse ``path`` now, before any work, if a file cannot be written there.

    Refused: an existing directory, a path whose folder is a file (``a.pte/b.pte``), a folder that
    is read-only (probed by creating and removing a temporary file, so it holds for root and for
    read-only mounts alike). A missing folder is created later by the writer, so only its nearest
    existing ancestor is checked. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; pass a file path, e.g. {path / 'model.pte'}")
    # Nearest existing ancestor: it must be a directory we can create files in.
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{what} {path} goes through {parent}, which is a file, not a folder; "
                              f"pass a path in an existing folder")
    if not _can_create_in(parent):
        raise OutputPathError(f"{what} {path}: folder {parent} is not writable; "
                              f"pass a path in a writable folder or fix its permissions")
    return path


def _can_create_in(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fxport-probe-")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


# ----------------------------------------------------------------------------- files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename itself already happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_in(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync-ed and renamed onto ``path``.

    For writers that take a path. On any exception (``KeyboardInterrupt`` included) the
    temporary is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_in(path.parent, path.name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _no_space(exc, path)
        if err is exc:
            raise
        raise err from exc
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[BinaryIO | TextIO]:
    """Open a temporary file beside ``path`` for writing; flush, fsync and rename it on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a new file: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        f = open(tmp, mode, encoding=encoding if "b" not in mode else None)
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Atomic ``Path.write_bytes``."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomic ``Path.write_text``."""
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


# ----------------------------------------------------------------------------- directories


def remove_tree(path: PathLike) -> None:
    """Remove a file or a directory tree if it exists (a stale sidecar)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_dir_in(new: Path, path: Path) -> None:
    """Rename the finished directory ``new`` onto ``path``; restores the old one if that fails."""
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
        old.rmdir()
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        remove_tree(old)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole.

    The previous directory is never mixed with the new one (no stale files survive). On any
    exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_dir_in(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _no_space(exc, path)
        if err is exc:
            raise
        raise err from exc


# ----------------------------------------------------------------------------- program + sidecar


def weights_file(program: PathLike) -> Path:
    """Where a program's weights file lives: ``<stem>.ptd`` beside the ``.pte`` (written by
    :class:`fxport.lowering.xnnpack.XnnpackProgram` when the program has one, loaded by
    :class:`fxport.runtime.pte_backend.PteBackend`)."""
    return Path(program).with_suffix(".ptd")


def write_program(
    path: PathLike,
    data: bytes | bytearray | memoryview | Callable[[Path], None],
    *,
    sidecar: PathLike | None = None,
    fill_sidecar: Callable[[Path], None] | None = None,
    beside: PathLike | None = None,
) -> Path:
    """Write a program and replace its sidecar directory with it, as a pair.

    ``data`` is the program's bytes, or a function that writes the program to the path it is given.
    ``sidecar`` (e.g. ``model.tokenizer/``) is rebuilt whole by ``fill_sidecar(tmp_dir)``; with
    ``fill_sidecar=None`` an existing sidecar is removed, because it belongs to the previous
    program. ``beside`` is a staging directory (:func:`staging_dir`) whose files (e.g. the CUDA
    ``.ptd`` weights) are moved next to the program just before it. Everything is written to
    temporaries first; the renames come last, so a failure while writing leaves the previous
    files as they were.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = Path(sidecar) if sidecar is not None else None
    side_tmp: Path | None = None
    tmp = _temp_in(path.parent, path.name)
    try:
        if side is not None and fill_sidecar is not None:
            side_tmp = Path(tempfile.mkdtemp(dir=side.parent, prefix=f".{side.name}.", suffix=".tmp"))
            fill_sidecar(side_tmp)
            _fsync_tree(side_tmp)
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        extra = sorted(p for p in Path(beside).iterdir() if p.is_file()) if beside is not None else []
        for f in extra:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # Everything is on disk: publish the files beside the program, the sidecar, then the program.
        for f in extra:
            os.replace(f, path.parent / f.name)
        if side is not None:
            if side_tmp is not None:
                _swap_dir_in(side_tmp, side)
                side_tmp = None
            elif side.exists() or side.is_symlink():
                remove_tree(side)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if side_tmp is not None:
            shutil.rmtree(side_tmp, ignore_errors=True)
        err = _no_space(exc, path)
        if err is exc:
            raise
        raise err from exc
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def staging_dir(folder: PathLike) -> Iterator[Path]:
    """A temporary directory inside ``folder`` (same filesystem, so its files can be renamed into
    ``folder``), removed with whatever is left in it on exit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".fxport-stage-", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_no_space(exc: BaseException) -> bool:
    """True for a full disk or quota (``ENOSPC`` / ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
