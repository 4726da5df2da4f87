"""Atomic output: a failed, killed or out-of-space write leaves the previous file and no fragment."""

from __future__ import annotations

import builtins
import errno
import io
import os
import tempfile
from pathlib import Path

import pytest

from fxport import fileio
from fxport.fileio import OutputPathError, atomic_dir, atomic_file, check_writable_output, write_bytes, write_program

OLD = b"previous valid program " * 100
NEW = bytes(range(256)) * 64  # 16 KiB


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


class _FailingFile(io.FileIO):
    """A file whose writes fail once ``limit`` bytes have been written (a disk that fills up)."""

    limit = 1000
    exc: BaseException = OSError(errno.ENOSPC, "No space left on device")

    def write(self, b):  # type: ignore[override]
        room = self.limit - self.tell()
        if room <= 0:
            raise self.exc
        if len(b) > room:
            super().write(bytes(b[:room]))
            raise self.exc
        return super().write(b)


@pytest.fixture
def failing_open(monkeypatch):
    """Patch ``open`` so that files opened for writing fail after ``_FailingFile.limit`` bytes."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode:
            return _FailingFile(file, "w")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return _FailingFile


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                 RuntimeError("writer failed")], ids=["enospc", "kill", "error"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, failing_open, monkeypatch, exc):
    out = tmp_path / "model.pte"
    out.write_bytes(OLD)
    monkeypatch.setattr(failing_open, "exc", exc)
    with pytest.raises(type(exc)):
        write_bytes(out, NEW)
    assert out.read_bytes() == OLD
    assert _listing(tmp_path) == ["model.pte"]


def test_failure_after_n_bytes_through_atomic_file(tmp_path, failing_open):
    out = tmp_path / "model.pte"
    with pytest.raises(fileio.OutputWriteError) as info:
        with atomic_file(out) as f:
            f.write(NEW[:600])
            f.write(NEW[600:])  # crosses the 1000-byte limit
    assert info.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == []  # no previous file, and no fragment either


def test_enospc_at_fsync(tmp_path, monkeypatch):
    """ENOSPC reported late, at fsync (delayed allocation, network filesystems), is handled the same way."""
    out = tmp_path / "model.pte"
    out.write_bytes(OLD)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(fileio.OutputWriteError) as info:
        write_bytes(out, NEW)
    assert fileio.is_no_space(info.value)
    assert str(info.value) == (f"no space left on the device writing {out} (No space left on device); the "
                               "previous file, if any, is unchanged: free some space or write to another disk")
    assert out.read_bytes() == OLD
    assert _listing(tmp_path) == ["model.pte"]


def test_successful_write_replaces_and_cleans(tmp_path):
    out = tmp_path / "sub" / "model.pte"
    write_bytes(out, OLD)
    write_bytes(out, NEW)
    assert out.read_bytes() == NEW
    assert _listing(out.parent) == ["model.pte"]


def test_interrupt_inside_atomic_file_block(tmp_path):
    out = tmp_path / "dump.txt"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(out, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert out.read_text() == "old"
    assert _listing(tmp_path) == ["dump.txt"]


# ----------------------------------------------------------------------------- directories and sidecars


def _fill(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)
    return fill


def test_atomic_dir_replaces_whole_directory(tmp_path):
    side = tmp_path / "model.tokenizer"
    side.mkdir()
    (side / "stale.json").write_text("old")
    with atomic_dir(side) as tmp:
        (tmp / "tokenizer.json").write_text("new")
    assert _listing(side) == ["tokenizer.json"]
    assert _listing(tmp_path) == ["model.tokenizer"]


def test_atomic_dir_failure_keeps_old_directory(tmp_path):
    side = tmp_path / "model.tokenizer"
    side.mkdir()
    (side / "tokenizer.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(side) as tmp:
            (tmp / "tokenizer.json").write_text("new")
            raise KeyboardInterrupt
    assert (side / "tokenizer.json").read_text() == "old"
    assert _listing(tmp_path) == ["model.tokenizer"]


def test_write_program_pairs_program_and_sidecar(tmp_path):
    out, side = tmp_path / "model.pte", tmp_path / "model.tokenizer"
    write_program(out, OLD, sidecar=side, fill_sidecar=_fill({"a.json": "1", "old-only.json": "x"}))
    write_program(out, NEW, sidecar=side, fill_sidecar=_fill({"a.json": "2"}))
    assert out.read_bytes() == NEW
    assert _listing(side) == ["a.json"] and (side / "a.json").read_text() == "2"
    # A re-export without a tokenizer removes the previous program's sidecar (it would be stale).
    write_program(out, OLD, sidecar=side)
    assert _listing(tmp_path) == ["model.fxport", "model.pte"]


@pytest.mark.parametrize("where", ["program", "sidecar"])
def test_write_program_failure_keeps_previous_pair(tmp_path, where):
    out, side = tmp_path / "model.pte", tmp_path / "model.tokenizer"
    write_program(out, OLD, sidecar=side, fill_sidecar=_fill({"a.json": "old"}))

    def program(tmp: Path) -> None:
        tmp.write_bytes(NEW[:100])
        if where == "program":
            raise KeyboardInterrupt

    def sidecar(folder: Path) -> None:
        (folder / "a.json").write_text("new")
        if where == "sidecar":
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises((KeyboardInterrupt, OSError)):
        write_program(out, program, sidecar=side, fill_sidecar=sidecar)
    assert out.read_bytes() == OLD
    assert (side / "a.json").read_text() == "old"
    assert _listing(tmp_path) == ["model.fxport", "model.pte", "model.tokenizer"]
    assert len(_listing(tmp_path / "model.fxport")) == 2  # current and its generation: the failed one is gone


# ----------------------------------------------------------------------------- output path checks


def test_check_refuses_a_directory(tmp_path):
    with pytest.raises(OutputPathError, match=rf"output {tmp_path} is a directory; pass a file path, e.g. "):
        check_writable_output(tmp_path)


def test_check_refuses_a_path_through_a_file(tmp_path):
    (tmp_path / "a.pte").write_bytes(b"x")
    bad = tmp_path / "a.pte" / "sub" / "b.pte"
    with pytest.raises(OutputPathError, match=rf"goes through {tmp_path / 'a.pte'}, which is a file, not a folder"):
        check_writable_output(bad)


def test_check_accepts_new_folders_and_existing_files(tmp_path):
    (tmp_path / "m.pte").write_bytes(b"x")
    assert check_writable_output(tmp_path / "m.pte") == tmp_path / "m.pte"
    assert check_writable_output(tmp_path / "new" / "deeper" / "m.pte") == tmp_path / "new" / "deeper" / "m.pte"
    assert _listing(tmp_path) == ["m.pte"]  # the probe leaves nothing behind


def _check_as_unprivileged(path: Path) -> str:
    """``check_writable_output(path)``'s message, in a forked child that dropped root (root ignores mode bits)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec, only this pure-Python check
        code = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                check_writable_output(path)
                message = "accepted"
            except OutputPathError as e:
                message = str(e)
            os.write(write, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_check_refuses_a_read_only_folder():
    base = Path(tempfile.mkdtemp(prefix="fxport-ro-"))  # not under tmp_path: the child must reach it
    ro = base / "ro"
    try:
        os.chmod(base, 0o755)
        ro.mkdir()
        os.chmod(ro, 0o555)
        assert _check_as_unprivileged(ro / "model.pte") == (
            f"output {ro / 'model.pte'}: folder {ro} is not writable; "
            f"pass a path in a writable folder or fix its permissions")
        os.chmod(ro, 0o777)
        assert _check_as_unprivileged(ro / "model.pte") == "accepted"
        assert _listing(ro) == []
    finally:
        os.chmod(ro, 0o755)
        ro.rmdir()
        base.rmdir()


def test_write_program_publishes_files_beside_it(tmp_path):
    """CUDA programs: the .ptd weights are staged, then renamed next to the program with it."""
    out = tmp_path / "model.pte"
    (tmp_path / "weights.ptd").write_bytes(b"old weights")
    with fileio.staging_dir(tmp_path) as stage:
        (stage / "weights.ptd").write_bytes(b"new weights")
        write_program(out, NEW, beside=stage)
    assert out.read_bytes() == NEW and (tmp_path / "weights.ptd").read_bytes() == b"new weights"
    assert _listing(tmp_path) == ["model.fxport", "model.pte", "weights.ptd"]


def test_write_program_failure_keeps_files_beside_it(tmp_path):
    out = tmp_path / "model.pte"
    out.write_bytes(OLD)
    (tmp_path / "weights.ptd").write_bytes(b"old weights")

    def program(tmp: Path) -> None:
        tmp.write_bytes(NEW[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(fileio.OutputWriteError):
        with fileio.staging_dir(tmp_path) as stage:
            (stage / "weights.ptd").write_bytes(b"new weights")
            write_program(out, program, beside=stage)
    assert out.read_bytes() == OLD and (tmp_path / "weights.ptd").read_bytes() == b"old weights"
    assert _listing(tmp_path) == ["model.pte", "weights.ptd"]
