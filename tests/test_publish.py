"""A program set (``x.pte`` + ``x.ptd`` + ``x.tokenizer/``) is published as one.

Every test reads the set the way its two readers do: ExecuTorch's stock runner opens the names
it is given (``x.pte``, ``x.ptd``, ``x.tokenizer/tokenizer.json``), fxport resolves ``x.pte``
and reads ``<stem>.ptd`` beside its target (:func:`fxport.fileio.weights_file`). Both must see
the complete previous set or the complete new one after a writer dies at any step of a save
(a forked writer that ``os._exit``-s, as kill -9 does: no handler, no cleanup), and after two
writers publish to one path at the same time. A killed writer's temporaries are removed by the
next save; a live writer's are not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fxport import fileio
from fxport.fileio import program_store, remove_dead_temporaries, weights_file, write_program

OLD = (b"old program " * 50, b"old weights " * 80, '{"old": 1}')
NEW = (b"new program " * 60, b"new weights " * 90, '{"new": 2}')
BARE = (b"bare program " * 40, None, None)  # a program without weights or tokenizer


def _publish(out: Path, files: tuple) -> None:
    """Save ``files`` = (pte bytes, ptd bytes or None, tokenizer.json text or None) as builds do
    (:meth:`fxport.lowering.xnnpack.XnnpackProgram.write`)."""
    pte, ptd, tok = files
    fill = None if tok is None else (lambda d: (d / "tokenizer.json").write_text(tok))
    side = out.with_suffix(".tokenizer")
    owned = [out.with_suffix(".ptd").name]
    if ptd is None:
        write_program(out, pte, sidecar=side, fill_sidecar=fill, owned=owned)
        return
    with fileio.staging_dir(out.parent) as stage:
        (stage / out.with_suffix(".ptd").name).write_bytes(ptd)
        write_program(out, pte, sidecar=side, fill_sidecar=fill, beside=stage, owned=owned)


def _legacy(out: Path, files: tuple) -> None:
    """The layout of earlier fxport versions: plain files and a plain folder."""
    pte, ptd, tok = files
    out.write_bytes(pte)
    out.with_suffix(".ptd").write_bytes(ptd)
    (out.with_suffix(".tokenizer")).mkdir()
    (out.with_suffix(".tokenizer") / "tokenizer.json").write_text(tok)


def _read(path: Path):
    try:
        return path.read_bytes() if path.suffix != ".json" else path.read_text()
    except FileNotFoundError:
        return None


def _seen(out: Path) -> tuple[tuple, tuple | None]:
    """(what the stock runner reads by name, what fxport reads through the resolved program;
    None when that generation was replaced and removed while being read -- an open file would
    have stayed readable)."""
    by_name = (_read(out), _read(out.with_suffix(".ptd")), _read(out.with_suffix(".tokenizer") / "tokenizer.json"))
    real = Path(os.path.realpath(out))  # resolved once: one generation
    by_fxport = (_read(real), _read(weights_file(real)), _read(real.with_suffix(".tokenizer") / "tokenizer.json"))
    return by_name, by_fxport if real.exists() else None


STEPS = ("replace", "rename", "symlink", "unlink", "link", "rmdir", "mkdir")


def _die_at(step: int, out: Path, files: tuple) -> int:
    """Run ``_publish(out, files)`` in a forked child that dies (``os._exit(9)``) when it reaches
    its ``step``-th filesystem call of :data:`STEPS`; returns the child's exit status
    (0: the save finished before that step)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            count = [0]

            def dying(real):
                def call(*args, **kwargs):
                    count[0] += 1
                    if count[0] == step:
                        os._exit(9)
                    return real(*args, **kwargs)
                return call

            for name in STEPS:
                setattr(os, name, dying(getattr(os, name)))
            fileio._exchange = dying(fileio._exchange)
            _publish(out, files)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("before,after", [("published", NEW), ("legacy", NEW), ("published", BARE), ("legacy", BARE),
                                          ("bare", NEW)])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_set(tmp_path, monkeypatch, before, after):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a kill, not a power loss: fsync changes nothing here
    steps = 0
    for step in range(1, 200):
        folder = tmp_path / f"k{step}"
        folder.mkdir()
        out = folder / "x.pte"
        old = BARE if before == "bare" else OLD
        if before == "legacy":
            _legacy(out, old)
        else:
            _publish(out, old)
        rc = _die_at(step, out, after)
        by_name, by_fxport = _seen(out)
        assert by_name in (old, after), (step, by_name)
        assert by_fxport in (old, after), (step, by_fxport)
        # The next save finishes the job: the new set, and nothing of the dead writer left.
        _publish(out, after)
        assert _seen(out) == (after, after)
        names = sorted(os.listdir(folder))
        assert names == sorted(["x.fxport", "x.pte"] + (["x.ptd", "x.tokenizer"] if after[1] else [])), (step, names)
        store = sorted(os.listdir(program_store(out)))
        assert len(store) == 2 and store[1] == "g-" + store[1][2:] and store[0] == "current", (step, store)
        if rc == 0:  # the save ran to its end before the step it was to die at: all steps covered
            steps = step - 1
            break
        assert rc == 9
    assert steps >= 10  # the save was interrupted at each of its filesystem steps


def _writer(out: Path, files: tuple, rounds: int) -> subprocess.Popen:
    code = ("from fxport.tests.test_publish import _publish; "
            f"from pathlib import Path\nfor _ in range({rounds}): _publish(Path({str(out)!r}), {files!r})")
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


def test_two_concurrent_writers_leave_one_complete_set(tmp_path):
    out = tmp_path / "x.pte"
    _publish(out, OLD)
    writers = [_writer(out, NEW, 8), _writer(out, BARE, 8)]
    seen = set()
    while any(w.poll() is None for w in writers):
        by_name, by_fxport = _seen(out)
        if by_fxport is not None:
            seen.add(by_fxport)
            assert by_fxport in (OLD, NEW, BARE), by_fxport  # fxport's reader sees one generation
    for w in writers:
        assert w.wait() == 0, w.stderr.read().decode()
    final = _seen(out)
    assert final[0] == final[1] and final[0] in (NEW, BARE)
    _publish(out, NEW)  # and the next save leaves one generation, no temporaries
    assert len(os.listdir(program_store(out))) == 2
    assert sorted(os.listdir(tmp_path)) == ["x.fxport", "x.ptd", "x.pte", "x.tokenizer"]


def test_a_writer_publishing_between_anothers_switch_and_tidy_keeps_its_weights(tmp_path):
    """The interleaving CI once hit by chance, forced: writer B (a program without weights)
    pauses right after switching ``current``; writer A publishes NEW in that pause. B's tidying
    (unlinking the x.ptd / x.tokenizer its program lacks) must not strip A's links: A waits for
    B's publish lock, then publishes whole."""
    out = tmp_path / "x.pte"
    _publish(out, OLD)
    paused = tmp_path / "b-switched"
    code = ("import time; from pathlib import Path; from fxport import fileio\n"
            "from fxport.tests.test_publish import _publish, BARE\n"
            "real = fileio._switch\n"
            "def switch(*a):\n"
            "    old = real(*a); Path(%r).touch(); time.sleep(1.0); return old\n"
            "fileio._switch = switch\n"
            "_publish(Path(%r), BARE)\n") % (str(paused), str(out))
    b = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not paused.exists():
        assert b.poll() is None, b.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _publish(out, NEW)  # A, while B sits between its switch and its tidying
    assert b.wait() == 0, b.stderr.read().decode()
    assert _seen(out) == (NEW, NEW)
    assert sorted(os.listdir(tmp_path)) == ["b-switched", "x.fxport", "x.ptd", "x.pte", "x.tokenizer"]


# ----------------------------------------------------------------------------- litter of dead writers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_writers_temporaries_are_removed_by_the_next_save(tmp_path):
    out = tmp_path / "x.pte"
    _publish(out, OLD)
    assert _die_at(12, out, NEW) == 9  # dies after its generation and temporaries exist
    litter = [p for p in os.listdir(tmp_path) + os.listdir(program_store(out))
              if p.endswith(".tmp") or (p.startswith("g-") and p != os.readlink(program_store(out) / "current"))]
    assert litter  # the dead writer's new generation (and a staging folder) are still there
    dead = _dead_pid()
    for name in (f".x.pte.fxport-{dead}-abc123.tmp", f".fxport-stage.fxport-{dead}-0f0f.tmp"):
        (tmp_path / name).mkdir() if "stage" in name else (tmp_path / name).write_bytes(b"half")
    (program_store(out) / f"g-{dead}-deadbeef").mkdir()
    _publish(out, NEW)
    assert sorted(os.listdir(tmp_path)) == ["x.fxport", "x.ptd", "x.pte", "x.tokenizer"]
    assert len(os.listdir(program_store(out))) == 2


def test_a_live_writers_temporaries_are_kept(tmp_path):
    out = tmp_path / "x.pte"
    _publish(out, OLD)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        temp = tmp_path / f".x.pte.fxport-{live.pid}-abc123.tmp"
        temp.write_bytes(b"being written")
        gen = program_store(out) / f"g-{live.pid}-0123abcd"
        gen.mkdir()
        (gen / "x.pte").write_bytes(b"being written")
        _publish(out, NEW)
        assert temp.read_bytes() == b"being written" and (gen / "x.pte").exists()
    finally:
        live.kill()
        live.wait()
    assert set(remove_dead_temporaries(tmp_path)) == {temp, gen}  # once it is gone, they go
    assert sorted(os.listdir(tmp_path)) == ["x.fxport", "x.ptd", "x.pte", "x.tokenizer"]


def test_weights_file_of_a_symlinked_program_is_beside_the_target(tmp_path):
    """``latest.pte -> builds/x.pte``: the weights are ``builds/x.ptd``, not ``latest.ptd``."""
    builds = tmp_path / "builds"
    builds.mkdir()
    (builds / "x.pte").write_bytes(b"p")
    (builds / "x.ptd").write_bytes(b"w")
    (tmp_path / "latest.pte").symlink_to(builds / "x.pte")
    assert weights_file(tmp_path / "latest.pte") == builds / "x.ptd"
    assert weights_file(builds / "x.pte") == builds / "x.ptd"
    shutil.rmtree(builds)
    assert weights_file(tmp_path / "missing.pte") == tmp_path / "missing.ptd"


def test_a_file_where_the_store_goes_is_refused_before_any_work(tmp_path):
    from fxport.fileio import OutputPathError, check_writable_output

    (tmp_path / "x.fxport").write_text("mine")
    with pytest.raises(OutputPathError) as err:
        check_writable_output(tmp_path / "x.pte", what="--out")
    assert str(err.value) == (f"--out {tmp_path / 'x.pte'}: {tmp_path / 'x.fxport'} exists and is not a folder (a "
                              "program keeps its published files there); remove it or choose another path")


def test_temporaries_of_earlier_versions_go_once_old(tmp_path):
    """Names without a pid (fxport before this layout): removed when older than an hour, kept
    while fresh (their writer could still be running); other hidden files are never touched."""
    old = [".x.pte.k2j4h1a9.tmp", ".fxport-stage-0a_b1c2d.tmp", ".x.tokenizer.q9w8e7r6.tmp", ".x.tokenizer.old.abcdefgh"]
    fresh = ".y.pte.zzzzzzzz.tmp"
    foreign = [".bashrc", ".notes.abcdefgh.tmp"]
    for name in old + [fresh] + foreign:
        (tmp_path / name).mkdir() if "tokenizer" in name or "stage" in name else (tmp_path / name).write_bytes(b"x")
    hour_ago = __import__("time").time() - fileio.LEGACY_AGE - 60
    for name in old + foreign:
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    assert sorted(p.name for p in remove_dead_temporaries(tmp_path)) == sorted(old)
    assert sorted(os.listdir(tmp_path)) == sorted([fresh] + foreign)
