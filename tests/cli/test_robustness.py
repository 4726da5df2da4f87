"""The command line against a hostile folder and bad values: the huge-pages re-execution never
imports code from the current folder, and bad option values and files give one line, exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fxport.cli import main
from fxport.runtime import huge_pages


def _error(capfd, argv) -> str:
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.skipif(not huge_pages.available(), reason="needs Linux, glibc and transparent huge pages not 'never'")
def test_a_malicious_fxport_package_in_the_current_folder_is_not_imported(tiny_pte, tmp_path):
    """``fxport bench`` re-executes itself for huge pages; in a folder holding an ``fxport/``
    package that code must not run (it would write ``pwned``)."""
    evil = tmp_path / "fxport"
    evil.mkdir()
    code = f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')\nraise SystemExit(7)\n"
    (evil / "__init__.py").write_text(code)
    (evil / "cli.py").write_text(code)
    command = shutil.which("fxport", path=str(Path(sys.executable).parent))
    assert command is not None
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FXPORT_HUGE_PAGES", "PYTHONPATH")}
    done = subprocess.run([command, "bench", str(tiny_pte), "--prompt-len", "2", "--new-tokens", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "pwned").exists()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith("huge pages on)")  # it did re-execute


def test_demo_max_gap_nan_is_refused_when_parsed(capfd):
    for bad in ("nan", "inf", "-1"):
        assert _error(capfd, ["demo", "--max-gap", bad]) == (
            f"fxport: error: argument --max-gap: expected a finite number of logits >= 0, got '{bad}' "
            "(see 'fxport demo --help')")


def test_gguf_given_a_text_file(capfd, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes")
    out = tmp_path / "m.pte"
    assert _error(capfd, ["export", "--gguf", str(notes), "--out", str(out), "--quiet"]) == (
        f"fxport export: error: {notes} is not a GGUF file (starts with b'thes', expected b'GGUF') nor a Hugging "
        "Face checkpoint; pass a .gguf file (--gguf) or a model directory (--hf)")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_bench_on_a_multimodal_program(capfd, tmp_path):
    """A program with an image encoder (its prefill also takes feature rows): one line, not the
    runtime's "error 0x12"."""
    import torch
    from executorch.exir import to_edge
    from torch.export import export

    class Prefill(torch.nn.Module):
        def forward(self, tokens, pos, features):
            return tokens.float().sum() + pos.float().sum() + features.sum()

    class Encoder(torch.nn.Module):
        def forward(self, image):
            return image * 2

    programs = {"prefill": export(Prefill(), (torch.zeros(1, 2, dtype=torch.long), torch.arange(2), torch.zeros(1, 4))),
                "image_encoder": export(Encoder(), (torch.zeros(1, 4),))}
    path = tmp_path / "mm.pte"
    path.write_bytes(to_edge(programs).to_executorch().buffer)
    assert _error(capfd, ["bench", str(path), "--prompt-len", "2", "--new-tokens", "1"]) == (
        f"fxport bench: error: {path} is a multimodal program (image_encoder); bench times text-only programs on "
        f"token ids: time it with fxport run {path} --prompt TEXT (tok/s are printed), or bench a text-only export")


def test_no_weights_check_is_scoped_to_the_command(monkeypatch, tmp_path, capfd):
    """``--no-weights-check`` turns the check off for the command only."""
    from fxport.runtime import integrity

    seen = []
    monkeypatch.delenv("FXPORT_CHECK_WEIGHTS", raising=False)
    monkeypatch.setattr("fxport.cli.cmd_run", lambda args: seen.append(integrity.enabled()) or 0)
    p = tmp_path / "m.pte"
    p.write_bytes(b"x")
    assert main(["run", str(p), "--prompt-ids", "2", "--no-weights-check"]) == 0
    assert main(["run", str(p), "--prompt-ids", "2"]) == 0
    assert seen == [False, True] and "FXPORT_CHECK_WEIGHTS" not in os.environ


def test_a_full_disk_while_the_ptd_is_written_exits_2_naming_it(capfd, tmp_path, monkeypatch):
    """ExecuTorch writing the .ptd hits ENOSPC: one line with the .ptd's path, exit 2, the previous
    program untouched (export and lowering replaced by a program whose manager fails: only the save runs)."""
    import errno
    from types import SimpleNamespace

    from fxport import builder
    from fxport.lowering import xnnpack

    monkeypatch.setattr(builder, "export_programs", lambda model, options, methods: {})  # no export, no passes:
    monkeypatch.setattr(xnnpack, "run_passes", lambda programs, options, windows: ({}, {}))  # only the save matters

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xnnpack, "lower", lambda programs, **kw: xnnpack.XnnpackProgram(
        b"new", None, [], ["prefill"], manager=SimpleNamespace(write_tensor_data_to_file=full)))
    out = tmp_path / "m.pte"
    out.write_bytes(b"previous program")
    assert _error(capfd, ["export", "--preset", "tiny-gemma3", "--layers", "1", "--max-seq-len", "16",
                          "--max-prefill-chunk", "4", "--out", str(out), "--quiet"]) == (
        f"fxport export: error: no space left on the device writing {tmp_path / 'm.ptd'} (No space left on "
        "device); the previous file, if any, is unchanged: free some space or write to another disk")
    assert out.read_bytes() == b"previous program" and sorted(os.listdir(tmp_path)) == ["m.pte"]
