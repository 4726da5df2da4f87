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

A directory is built whole in a temporary directory and swapped in with two renames (old aside,
new in place); if the second rename fails the old one is put back (:func:`atomic_dir`).

A program is several names -- ``x.pte``, its weights ``x.ptd``, its tokenizer ``x.tokenizer/``
-- that must change together: :func:`write_program` publishes them as links through one pointer
that a single rename switches (see "program sets" below), so a reader sees the complete previous
set or the complete new one, whatever step a writer is killed at, and two writers to one path
leave one of their sets whole. Temporaries carry their writer's pid; the next save removes a
dead writer's (:func:`remove_dead_temporaries`), never a live one's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, TextIO, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "OutputPathError",
    "OutputWriteError",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "no_space_error",
    "check_writable_output",
    "program_store",
    "read_record",
    "remove_dead_temporaries",
    "remove_tree",
    "sha256_file",
    "staging_dir",
    "weights_file",
    "write_bytes",
    "write_program",
    "write_text",
]


class OutputPathError(ValueError):
    """An output path fxport cannot write to; the message names the path and the fix."""


class OutputWriteError(OSError):
    """Writing an output ran out of space (``ENOSPC`` / ``EDQUOT``); the previous file is intact."""


def no_space_error(exc: BaseException, path: Path) -> BaseException:
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
    store = program_store(path)
    if store.exists() and not store.is_dir():
        raise OutputPathError(f"{what} {path}: {store} exists and is not a folder (a program keeps its published "
                              f"files there); remove it or choose another path")
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
    """An empty temporary file beside ``folder / name``, named with this writer's pid
    (:func:`remove_dead_temporaries` removes it if the writer is killed)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.fxport-{os.getpid()}-", suffix=".tmp")
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
        err = no_space_error(exc, path)
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
        old = _aside(path)
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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.fxport-{os.getpid()}-", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_dir_in(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = no_space_error(exc, path)
        if err is exc:
            raise
        raise err from exc


# ----------------------------------------------------------------------------- program sets
#
# A program is a set of names in its folder: ``x.pte``, its weights ``x.ptd`` (when it has
# them) and its tokenizer folder ``x.tokenizer/``. Two names cannot be replaced by one rename, so
# each is a symbolic link through one pointer, and the pointer is what a save replaces:
#
#     x.pte       -> x.fxport/current/x.pte
#     x.ptd       -> x.fxport/current/x.ptd
#     x.tokenizer -> x.fxport/current/x.tokenizer
#     x.fxport/current -> g-<pid>-<hex>            (one rename publishes the whole set)
#     x.fxport/g-<pid>-<hex>/x.pte, x.ptd, x.tokenizer/, program.json (sizes and sha256)
#
# ExecuTorch's runner given "x.pte" and "x.ptd" opens them through the links; fxport resolves
# the program once (:func:`weights_file`) and reads its weights beside the target, so it reads
# one generation even while another writer switches the pointer. A save builds its generation
# whole, fsyncs it, makes sure every link exists (a link whose generation lacks the file is
# dangling, which reads as "no such file", as before), then replaces ``current``, then removes
# the previous generation and the links the new program does not have. A writer killed at any
# step leaves the complete previous set or the complete new one; two writers to one path each
# publish a complete set, the last rename wins. Files from an earlier fxport (plain ``x.pte``,
# ``x.ptd``, ``x.tokenizer/``) are first adopted unchanged into a generation of their own (hard
# links), so the switch from them is atomic too. Copy a program with ``cp -L`` / ``rsync -L``.
#
# Temporaries carry their writer's pid (``.<name>.fxport-<pid>-<hex>.tmp``, ``g-<pid>-<hex>``);
# :func:`remove_dead_temporaries` removes those whose writer is gone, at the start of every save.

STORE_SUFFIX = ".fxport"
CURRENT = "current"
RECORD = "program.json"  # in each generation: {"program": name, "files": {name: {size, sha256}}}
_TEMP = re.compile(r"^\..*\.fxport-(\d+)-[0-9a-z_]+\.tmp$")
_GEN = re.compile(r"^g-(\d+)-[0-9a-f]+$")
_WRITING: set[str] = set()  # generations this process is writing now (never removed as garbage)
# Temporaries of fxport versions before the pid was in their names (``.x.pte.k2j4h1a9.tmp``,
# ``.fxport-stage-k2j4h1a9.tmp``, ``.x.tokenizer.old.k2j4h1a9``): their writer cannot be asked,
# so they go once untouched for LEGACY_AGE seconds (a save writes its temporaries in minutes).
_LEGACY = re.compile(r"^\.(?:fxport-stage-|.+\.(?:pte|ptd|tokenizer|json)\.(?:old\.)?)[a-z0-9_]{8}(?:\.tmp)?$")
LEGACY_AGE = 3600.0


def program_store(program: PathLike) -> Path:
    """The folder holding a program's generations: ``x.fxport/`` beside ``x.pte``."""
    return Path(program).with_suffix(STORE_SUFFIX)


def weights_file(program: PathLike) -> Path:
    """Where a program's weights file lives: ``<stem>.ptd`` beside the ``.pte`` it names -- beside
    the link's target when ``program`` is a symbolic link (a published program, or a user's
    ``latest.pte``), so the pair read is one generation (written by
    :class:`fxport.lowering.xnnpack.XnnpackProgram` when the program has one, loaded by
    :class:`fxport.runtime.pte_backend.PteBackend`)."""
    path = Path(program)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    return path.with_suffix(".ptd")


def _tag() -> str:
    """``<pid>-<hex>``: this writer, in every temporary and generation name."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _temp_name(name: str) -> str:
    return f".{name}.fxport-{_tag()}.tmp"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a pid reused by another process counts as alive: the
    temporary is kept, never a live writer's removed)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_dead_temporaries(folder: PathLike) -> list[Path]:
    """Remove what killed writers left in ``folder`` and in its program stores: fxport's
    temporaries (``.<name>.fxport-<pid>-<hex>.tmp``) and generations that are not ``current``,
    when process ``<pid>`` no longer exists. A live writer's (this one's included) are kept.
    Temporaries of earlier fxport versions (no pid in the name) go once older than
    :data:`LEGACY_AGE`. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP.match(entry.name)
        legacy = not m and _LEGACY.match(entry.name) and _age(entry, now) > LEGACY_AGE
        if (m and not _alive(int(m.group(1)))) or legacy:
            with contextlib.suppress(OSError):
                remove_tree(entry.path)
                removed.append(Path(entry.path))
        elif entry.name.endswith(STORE_SUFFIX) and entry.is_dir(follow_symlinks=False):
            store = Path(entry.path)
            current = _readlink(store / CURRENT)
            for sub in list(os.scandir(store)):
                m = _TEMP.match(sub.name) or _GEN.match(sub.name)
                if not m or sub.name == current:
                    continue
                pid = int(m.group(1))
                # this process's own generations are garbage unless one of its saves is writing it
                mine = pid == os.getpid() and _GEN.match(sub.name) and sub.path not in _WRITING
                if mine or not _alive(pid):
                    with contextlib.suppress(OSError):
                        remove_tree(sub.path)
                        removed.append(Path(sub.path))
    return removed


def _age(entry: os.DirEntry, now: float) -> float:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _link_target(store: Path, name: str) -> str:
    return f"{store.name}/{CURRENT}/{name}"


def _is_ours(link: Path, store: Path) -> bool:
    """``link`` is the published link of ``store`` (``x.pte -> x.fxport/current/x.pte``)."""
    return _readlink(link) == _link_target(store, link.name)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    cannot (the caller then renames in two steps)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _put_link(link: Path, target: str) -> None:
    """Make ``link`` a symbolic link to ``target`` in one rename; a directory there (a tokenizer
    folder of an earlier fxport, already adopted) is exchanged with the link, then removed."""
    if _readlink(link) == target:
        return
    tmp = link.parent / _temp_name(link.name)
    os.symlink(target, tmp)
    try:
        if link.is_dir() and not link.is_symlink():
            if _exchange(tmp, link):
                remove_tree(tmp)  # the old folder, now under the temporary name
                return
            aside = _aside(link)  # no atomic swap on this system: the folder is away for one rename
            os.replace(link, aside)
            os.replace(tmp, link)
            remove_tree(aside)
            return
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.is_symlink():
                tmp.unlink()
        raise


def _aside(path: Path) -> Path:
    return path.parent / _temp_name(path.name)


def _switch(store: Path, gen: str) -> str | None:
    """Point ``store/current`` at generation ``gen`` (one rename); returns the previous target."""
    current = store / CURRENT
    old = _readlink(current)
    tmp = store / _temp_name(CURRENT)
    os.symlink(gen, tmp)
    try:
        os.replace(tmp, current)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(store)
    return old


def _record(gen: Path, program: str, names: Sequence[str]) -> None:
    files = {}
    for name in names:
        f = gen / name
        if f.is_file():
            files[name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    with open(gen / RECORD, "w", encoding="utf-8") as fh:
        json.dump({"program": program, "files": files}, fh, indent=1, sort_keys=True)


def read_record(program: PathLike) -> dict | None:
    """The record of sizes and digests saved with the generation ``program`` resolves to (None
    for a program that was not published by :func:`write_program`, e.g. a copy)."""
    real = Path(os.path.realpath(program))
    try:
        data = json.loads((real.parent / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("program") != real.name or not isinstance(data.get("files"), dict):
        return None
    return data


def sha256_file(path: PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _adopt_legacy(folder: Path, store: Path, names: Sequence[str]) -> None:
    """Files of an earlier layout (plain ``x.pte`` / ``x.ptd`` / ``x.tokenizer/``, or a link of
    someone else's) become a generation of their own, unchanged (hard links; copies where the
    filesystem has none), and their names links to it: every step shows the same content."""
    legacy = [n for n in names if (folder / n).exists() and not _is_ours(folder / n, store)]
    if not legacy:
        return
    gen = store / f"g-{_tag()}"
    gen.mkdir()
    for name in names:
        src = folder / name
        if not src.exists():
            continue
        real = Path(os.path.realpath(src))
        if real.is_dir():
            shutil.copytree(real, gen / name, copy_function=_link_or_copy)
        else:
            _link_or_copy(real, gen / name)
    _fsync_tree(gen)
    old = _switch(store, gen.name)
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            _put_link(folder / name, _link_target(store, name))
    _fsync_dir(folder)
    if old and old != gen.name:
        with contextlib.suppress(OSError):
            _remove_generation(store / old)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_program(
    path: PathLike,
    data: bytes | bytearray | memoryview | Callable[[Path], None],
    *,
    sidecar: PathLike | None = None,
    fill_sidecar: Callable[[Path], None] | None = None,
    beside: PathLike | None = None,
    owned: Sequence[str] = (),
) -> Path:
    """Publish a program, its sidecar directory and the files beside it as one set (see the
    comment above: a new generation, then one rename of its ``current`` pointer).

    ``data`` is the program's bytes, or a function that writes the program to the path it is given.
    ``sidecar`` (e.g. ``model.tokenizer/``) is filled by ``fill_sidecar(dir)``; with
    ``fill_sidecar=None`` the new program has none, and a previous one is unlinked with the
    switch. ``beside`` is a staging directory (:func:`staging_dir`) whose files (the ``.ptd``
    weights) join the set. ``owned``: other names in the folder that belong to whatever program
    is at ``path`` (e.g. ``x.ptd`` when the new program has no weights file): they are unlinked
    with the switch too. A failure or a kill at any point leaves the previous set whole.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(folder)
    store = program_store(path)
    made_store = not store.exists()
    store.mkdir(exist_ok=True)
    gen = store / f"g-{_tag()}"
    _WRITING.add(str(gen))
    gen.mkdir()
    side = Path(sidecar) if sidecar is not None else None
    published = False
    lock = None
    try:
        names: list[str] = []
        extra = sorted(p for p in Path(beside).iterdir() if p.is_file()) if beside is not None else []
        for f in extra:  # the staging folder is in ``folder``: a rename, nothing published yet
            os.replace(f, gen / f.name)
            names.append(f.name)
        if side is not None and fill_sidecar is not None:
            (gen / side.name).mkdir()
            fill_sidecar(gen / side.name)
            names.append(side.name)
        if callable(data):
            data(gen / path.name)
        else:
            with open(gen / path.name, "wb") as f:
                f.write(data)
        names.append(path.name)  # last: its link is made last, the program appears once its files exist
        _record(gen, path.name, [n for n in names if n != (side.name if side else None)])
        _fsync_tree(gen)
        _fsync_dir(store)
        everything = list(dict.fromkeys(names + list(owned) + ([side.name] if side is not None else [])))
        lock = _PublishLock(store)
        _adopt_legacy(folder, store, everything)
        for name in names:
            _put_link(folder / name, _link_target(store, name))
        _fsync_dir(folder)
        old = _switch(store, gen.name)
        published = True
    except BaseException as exc:
        if lock is not None:
            lock.close()
        if not published:
            shutil.rmtree(gen, ignore_errors=True)
            if made_store:
                with contextlib.suppress(OSError):
                    store.rmdir()
        err = no_space_error(exc, path)
        if err is exc:
            raise
        raise err from exc
    finally:
        _WRITING.discard(str(gen))
    # Published. What is left is tidying: links of names the new program lacks, the old
    # generation. Still under the lock: another writer's links and switch cannot fall between
    # this writer's switch and its unlinks (which would leave its program without its x.ptd).
    with lock, contextlib.suppress(OSError):
        for name in everything:
            if name not in names and _is_ours(folder / name, store):
                (folder / name).unlink()
        _fsync_dir(folder)
        if old and old != gen.name and _readlink(store / CURRENT) != old:
            _remove_generation(store / old)
    return path


class _PublishLock:
    """An exclusive ``flock`` on a program store, held from a writer's first link to its last
    unlink, so two writers' publish steps never interleave (each writes its generation, the slow
    part, unlocked). The kernel drops it when the holder exits, killed or not: it never goes
    stale. Where the system has no ``flock`` the steps run unlocked, as before."""

    def __init__(self, store: Path):
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(store, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "_PublishLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_generation(gen: Path) -> None:
    """Rename a generation out of its name first, then delete it: a reader that resolved a path
    into it finds its files whole or not at all, never half removed."""
    aside = gen.parent / _temp_name(gen.name)
    os.replace(gen, aside)
    remove_tree(aside)


@contextlib.contextmanager
def staging_dir(folder: PathLike) -> Iterator[Path]:
    """A temporary directory inside ``folder`` (same filesystem, so its files can be renamed into
    ``folder``), removed with whatever is left in it on exit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / _temp_name("fxport-stage")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_no_space(exc: BaseException) -> bool:
    """True for a full disk or quota (``ENOSPC`` / ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
