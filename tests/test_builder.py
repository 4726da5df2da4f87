"""fxport.builder: stages in order with a time table, every bad option and output path refused
before any work (exact one-line errors), atomic save with the tokenizer sidecar, and the reuse
decision of ``make demo`` (inputs unchanged -> reused; any input changed -> rebuilt).

Most tests drive :func:`build` with a recording fake backend (the real XNNPACK lowering is
covered by tests/cli and tests/lowering, the CUDA dry run by tests/lowering/test_cuda_dryrun.py),
so they run in seconds on the ``tiny`` preset.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fxport import builder
from fxport.builder import BuildError, BuildOptions, Source, build, reuse_decision
from fxport.cli import main

PROGRAM = b"ET12-fake-program"


class FakeBackend:
    """Records the calls build() makes; writes PROGRAM (+ the sidecar) through fileio."""

    NAME = "fake"
    PROGRAM_SUFFIX = ".pte"

    def __init__(self):
        self.calls: list[str] = []

    def validate(self, options):
        self.calls.append("validate")
        if options.quant not in (None, "q"):
            raise ValueError(f"unknown --quant recipe {options.quant!r} for --backend fake; choose one of: q")

    def quantize(self, model, recipe, tokenizer=None):
        self.calls.append("quantize")
        return None

    METHODS = ("prefill", "decode")

    def export(self, model, options, methods):  # stands in for builder.export_programs (see the fixture)
        self.calls.append("export")
        assert methods == self.METHODS
        return {m: f"ep-{m}" for m in methods}

    def run_passes(self, programs, options, *, windows):
        self.calls.append("passes")
        # the builder reads the windows off the model: the one-layer tiny preset's sliding layer
        assert windows == {f"model.layers.0.self_attn.{kv}_cache": 4 for kv in "kv"}
        return programs, {}

    def dry_run(self, programs):
        self.calls.append("dry_run")
        return SimpleNamespace(summary=lambda: "dry", fully_delegated=True)

    def lower(self, programs, *, constant_methods=None, on_serialize=None):
        self.calls.append("lower")
        # the runner contract: get_max_seq_len = the prefill chunk, get_max_context_len = positions
        assert (constant_methods["get_max_seq_len"], constant_methods["get_max_context_len"]) == (4, 16)
        on_serialize()
        self.calls.append("serialize")
        from fxport.fileio import write_program

        def write(path, *, sidecar=None, fill_sidecar=None):
            self.calls.append("save")
            write_program(path, PROGRAM, sidecar=sidecar, fill_sidecar=fill_sidecar)
            return []

        return SimpleNamespace(report=None, write=write)


@pytest.fixture
def fake(monkeypatch):
    backend = FakeBackend()
    real = builder.backend_module
    monkeypatch.setattr(builder, "backend_module", lambda name: backend if name == "fake" else real(name))
    monkeypatch.setattr(builder, "export_programs", backend.export)
    return backend


OPTS = BuildOptions(backend="fake", quant="q", max_seq_len=16, max_prefill_chunk=4)
TINY = Source(preset="tiny-gemma3", layers=1)


# ----------------------------------------------------------------------------- stages


def test_stages_run_in_order_and_the_table_lists_them(fake, tmp_path, capsys):
    seen = []
    result = build(TINY, tmp_path / "m.pte", OPTS, on_stage=seen.append)
    assert fake.calls == ["validate", "quantize", "export", "passes", "lower", "serialize", "save"]
    assert seen == ["load", "quantize", "export", "passes", "lower", "serialize", "save"]
    assert list(result.times.seconds) == seen
    assert all(v >= 0 for v in result.times.seconds.values())
    assert (tmp_path / "m.pte").read_bytes() == PROGRAM
    table = result.times.table().splitlines()
    assert table[0].startswith("stage times (load average ")
    assert table[1].split() == ["stage", "wall", "s", "cpu", "s"]
    assert [row.split()[0] for row in table[2:]] == [*seen, "total"]
    total = float(table[-1].split()[1])
    assert total == pytest.approx(sum(result.times.seconds.values()), abs=0.06)


def test_float_build_has_no_quantize_stage_and_dry_run_writes_nothing(fake, tmp_path):
    result = build(TINY, tmp_path / "m.pte", BuildOptions(backend="fake", max_seq_len=16, max_prefill_chunk=4))
    assert list(result.times.seconds) == ["load", "export", "passes", "lower", "serialize", "save"]
    fake.calls.clear()
    result = build(TINY, None, BuildOptions(backend="fake", max_seq_len=16, max_prefill_chunk=4, dry_run=True))
    assert fake.calls == ["validate", "export", "passes", "dry_run"]
    assert result.out is None and list(result.times.seconds) == ["load", "export", "passes", "lower"]


# ----------------------------------------------------------------------------- validation before work


def _refused(capsys, argv, monkeypatch) -> str:
    """Run the CLI; loading a model would be work, so it fails the test."""
    monkeypatch.setattr(builder, "load_source", lambda *a, **k: pytest.fail("work started before validation"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("backend,quant", [("cuda", "8da4w"), ("xnnpack", "int4")])
def test_each_backend_validates_its_own_recipes(backend, quant, tmp_path, capsys, monkeypatch):
    choices = ", ".join(builder.backend_module(backend).recipe_names())
    assert quant not in choices.split(", ")
    line = _refused(capsys, ["export", "--preset", "tiny", "--backend", backend, "--quant", quant, "--dry-run",
                             "--out", str(tmp_path / "m.pte")] if backend == "cuda" else
                    ["export", "--preset", "tiny", "--backend", backend, "--quant", quant,
                     "--out", str(tmp_path / "m.pte")], monkeypatch)
    assert line == (f"fxport export: error: unknown --quant recipe {quant!r} for --backend {backend}; "
                    f"choose one of: {choices}")


def test_backend_options_refused_before_work(tmp_path, capsys, monkeypatch):
    line = _refused(capsys, ["export", "--preset", "tiny", "--dry-run", "--out", str(tmp_path / "m.pte")], monkeypatch)
    assert line == ("fxport export: error: --dry-run is a --backend cuda option (a partition report without a "
                    "GPU); --backend xnnpack builds on this CPU: drop --dry-run")
    line = _refused(capsys, ["export", "--preset", "tiny"], monkeypatch)
    assert line == "fxport export: error: no output path given; pass --out FILE.pte (or --dry-run)"
    line = _refused(capsys, ["export", "--preset", "tiny", "--max-seq-len", "8", "--max-prefill-chunk", "9",
                             "--out", str(tmp_path / "m.pte")], monkeypatch)
    assert line == "fxport export: error: --max-prefill-chunk 9 exceeds --max-seq-len 8"
    line = _refused(capsys, ["export", "--preset", "tiny", "--layers", "99", "--out", str(tmp_path / "m.pte")],
                    monkeypatch)
    assert line == "fxport export: error: --layers 99 exceeds the 6 layers of preset 'tiny'"
    import torch

    if not torch.cuda.is_available():
        line = _refused(capsys, ["export", "--preset", "tiny", "--backend", "cuda", "--out", str(tmp_path / "m.pte")],
                        monkeypatch)
        assert line == ("fxport export: error: --backend cuda compiles with AOTInductor on a CUDA GPU and none is "
                        "visible; add --dry-run for the partition report on this machine")


def test_bad_out_refused_before_work(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = _refused(capsys, ["export", "--preset", "tiny", "--out", str(tmp_path)], monkeypatch)
    assert line == f"fxport export: error: --out {tmp_path} must end in .pte"
    folder = tmp_path / "dir.pte"
    folder.mkdir()
    line = _refused(capsys, ["export", "--preset", "tiny", "--out", str(folder)], monkeypatch)
    assert line == (f"fxport export: error: --out {folder} is a directory; pass a file path, e.g. "
                    f"{folder / 'model.pte'}")
    through = a_file / "sub" / "m.pte"
    line = _refused(capsys, ["export", "--preset", "tiny", "--out", str(through)], monkeypatch)
    assert line == (f"fxport export: error: --out {through} goes through {a_file}, which is a file, not a folder; "
                    "pass a path in an existing folder")
    # A read-only folder: chmod does not stop root, so the probe that creates a file is what says no.
    ro = tmp_path / "ro"
    ro.mkdir()
    import fxport.fileio as fileio

    real = fileio._can_create_in
    monkeypatch.setattr(fileio, "_can_create_in", lambda folder: folder != ro and real(folder))
    line = _refused(capsys, ["export", "--preset", "tiny", "--out", str(ro / "m.pte")], monkeypatch)
    assert line == (f"fxport export: error: --out {ro / 'm.pte'}: folder {ro} is not writable; "
                    "pass a path in a writable folder or fix its permissions")
    (tmp_path / "w.ptd").mkdir()  # where the program's weights file would go
    line = _refused(capsys, ["export", "--preset", "tiny", "--out", str(tmp_path / "w.pte")], monkeypatch)
    assert line == (f"fxport export: error: --out {tmp_path / 'w.pte'}: its weights file {tmp_path / 'w.ptd'} "
                    "exists as a directory; remove it or choose another --out")


# ----------------------------------------------------------------------------- save


def test_save_is_atomic_and_replaces_a_stale_sidecar(fake, tmp_path, monkeypatch):
    out = tmp_path / "m.pte"
    out.write_bytes(b"previous program")
    stale = tmp_path / "m.tokenizer"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")

    def broken_lower(programs, *, constant_methods=None, on_serialize=None):
        def write(path, *, sidecar=None, fill_sidecar=None):
            from fxport.fileio import write_program

            def half(tmp):
                tmp.write_bytes(PROGRAM[:5])
                raise OSError(28, "No space left on device")

            write_program(path, half, sidecar=sidecar, fill_sidecar=fill_sidecar)

        return SimpleNamespace(report=None, write=write)

    monkeypatch.setattr(fake, "lower", broken_lower)
    with pytest.raises(OSError, match="No space left"):
        build(TINY, out, OPTS)
    assert out.read_bytes() == b"previous program"  # the old file, no fragment beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte", "m.tokenizer"]


def test_a_preset_build_removes_the_previous_programs_tokenizer(fake, tmp_path):
    out = tmp_path / "m.pte"
    stale = tmp_path / "m.tokenizer"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    result = build(TINY, out, OPTS)
    assert result.tokenizer_dir is None and not stale.exists()


# ----------------------------------------------------------------------------- reuse


def test_reuse_decision(fake, tmp_path, monkeypatch):
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"GGUF weights v1")
    real_load = builder.load_source
    monkeypatch.setattr(builder, "load_source", lambda source, *a, **k: real_load(TINY, 16))
    out = tmp_path / "m.pte"
    src = Source(gguf=gguf)

    first = build(src, out, OPTS, reuse=True)
    assert not first.reused
    manifest = json.loads((tmp_path / "m.pte.build.json").read_text())
    assert manifest["inputs"]["source"] == {"gguf_sha256": builder.file_sha256(gguf)}
    assert manifest["inputs"]["options"]["quant"] == "q" and manifest["sha256"] == builder.file_sha256(out)

    fake.calls.clear()
    again = build(src, out, OPTS, reuse=True)
    assert again.reused and fake.calls == ["validate"]
    assert again.reuse_reason.startswith("inputs unchanged since ")

    # Each input that changes means a rebuild, and the reason names it.
    other = BuildOptions(backend="fake", quant=None, max_seq_len=16, max_prefill_chunk=4)
    assert reuse_decision(out, builder.build_inputs(src, other)) == (False, "inputs changed: options")
    real_digest = builder.code_digest
    monkeypatch.setattr(builder, "code_digest", lambda: "other code")
    assert reuse_decision(out, builder.build_inputs(src, OPTS)) == (False, "inputs changed: fxport_code")
    monkeypatch.setattr(builder, "code_digest", real_digest)
    gguf.write_bytes(b"GGUF weights v2")
    assert reuse_decision(out, builder.build_inputs(src, OPTS)) == (False, "inputs changed: source")
    gguf.write_bytes(b"GGUF weights v1")
    out.write_bytes(PROGRAM + b"tampered")
    assert reuse_decision(out, builder.build_inputs(src, OPTS)) == \
        (False, "m.pte differs from the program the manifest recorded")
    fake.calls.clear()
    rebuilt = build(src, out, OPTS, reuse=True)
    assert not rebuilt.reused and fake.calls[-1] == "save" and out.read_bytes() == PROGRAM
    builder.manifest_path(out).unlink()
    assert reuse_decision(out, builder.build_inputs(src, OPTS)) == (False, "no build manifest m.pte.build.json")


def test_reuse_vouches_for_the_weights_file_too(fake, tmp_path, monkeypatch):
    """A program written with a ``.ptd`` (the manifest records its digest): reused only while
    that file is there and unchanged."""
    real_lower = fake.lower

    def lower_with_weights(programs, **kw):
        lowered = real_lower(programs, **kw)
        write = lowered.write

        def write_both(path, **k):
            write(path, **k)
            path.with_suffix(".ptd").write_bytes(b"weights v1")
            return [path.with_suffix(".ptd")]

        lowered.write = write_both
        return lowered

    monkeypatch.setattr(fake, "lower", lower_with_weights)
    out = tmp_path / "m.pte"
    first = build(TINY, out, OPTS, reuse=True)
    assert first.extra_files == [tmp_path / "m.ptd"]
    assert json.loads(builder.manifest_path(out).read_text())["files"] == \
        {"m.ptd": {"size": 10, "sha256": builder.file_sha256(tmp_path / "m.ptd")}}
    again = build(TINY, out, OPTS, reuse=True)
    assert again.reused and again.extra_files == [tmp_path / "m.ptd"]
    inputs = builder.build_inputs(TINY, OPTS)
    (tmp_path / "m.ptd").write_bytes(b"weights v2")
    assert reuse_decision(out, inputs) == (False, "m.ptd differs from the weights the manifest recorded")
    (tmp_path / "m.ptd").unlink()
    assert reuse_decision(out, inputs) == (False, "m.ptd (the program's weights) does not exist")


def test_a_build_without_reuse_drops_the_manifest(fake, tmp_path, monkeypatch):
    out = tmp_path / "m.pte"
    build(TINY, out, OPTS, reuse=True)
    assert builder.manifest_path(out).exists()
    build(TINY, out, OPTS)  # the file changed without a record: the old manifest must not vouch for it
    assert not builder.manifest_path(out).exists()


# ----------------------------------------------------------------------------- compile-time tools


def test_the_collector_is_paused_in_the_stages_and_collects_between_them(fake, tmp_path, monkeypatch):
    import gc

    states, collections = {}, []
    for name in ("quantize", "export", "run_passes", "lower"):
        step = getattr(fake, name)

        def spy(*args, _step=step, _name=name, **kwargs):
            states[_name] = gc.isenabled()
            return _step(*args, **kwargs)

        monkeypatch.setattr(fake, name, spy)
    monkeypatch.setattr(builder, "export_programs", fake.export)
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or real_collect(*a))
    assert gc.isenabled()
    build(TINY, tmp_path / "m.pte", OPTS)
    assert states == {"quantize": False, "export": False, "run_passes": False, "lower": False}
    assert gc.isenabled()  # back on after the build
    assert len(collections) == 6  # after load, quantize, export, passes, lowering (before serialize), at the end

    gc.disable()  # a caller's disabled collector: left as it is, nothing collected
    try:
        collections.clear()
        build(TINY, tmp_path / "m.pte", OPTS)
        assert not gc.isenabled() and collections == []
    finally:
        gc.enable()


def test_the_fxport_command_exits_after_its_exit_handlers_with_its_status(tmp_path):
    import subprocess
    import sys

    code = ("import atexit; from fxport.cli import _exit_now; "
            "atexit.register(lambda: print('exit handler ran')); print('output', end=' '); _exit_now(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "output exit handler ran\n"  # buffered output flushed, handlers run


def test_layers_inside_the_kv_shared_tail_are_refused_with_the_smallest_that_fits():
    from fxport.builder import check_source
    from fxport.models.gemma4.config import get_preset

    shared = get_preset("tiny").num_kv_shared_layers
    assert shared == 2
    for layers in (1, 3, 4):  # 3 and 4 keep a shared layer whose type has no earlier layer
        with pytest.raises(BuildError) as err:
            check_source(Source(preset="tiny", layers=layers))
        assert str(err.value) == (f"--layers {layers}: preset 'tiny' shares the KV caches of its last 2 layers with "
                                  "earlier layers of their type; pass --layers 5 / 6")
    check_source(Source(preset="tiny", layers=5))


@pytest.mark.parametrize("argv, on", [([], True), (["--no-speedups"], False)])
def test_fxport_export_no_speedups_switches_them_off(argv, on, tmp_path, monkeypatch):
    seen = []

    def stop(source, out, options, **kwargs):
        seen.append(options.speedups)
        raise BuildError("stopped before any work")

    monkeypatch.setattr(builder, "build", stop)
    assert main(["export", "--preset", "tiny-gemma3", "--out", str(tmp_path / "m.pte"), *argv]) == 2
    assert seen == [on]
    assert BuildOptions().speedups is True and "speedups" not in BuildOptions(speedups=False).key()
