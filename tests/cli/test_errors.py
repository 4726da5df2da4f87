"""Bad input through the command line: one line ``fxport <command>: error: ...`` naming the input
and a fix, exit status 2, no traceback, nothing half-written, and no runtime log noise."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from fxport.cli import main

from fxport.tests.models import tiny_gguf  # noqa: E402


def _error(capfd, argv, code=2) -> str:
    """The single stderr line of a failing command (fd-level: native runtime output counts too)."""
    capfd.readouterr()  # drop what fixtures printed
    assert main(argv) == code
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A good tiny GGUF, one with a NaN weight, one with a NaN rms_norm_eps, and an Ollama-style blob."""
    d = tmp_path_factory.mktemp("gguf")
    model = tiny_gguf.tiny_model()
    good = tiny_gguf.write_tiny_gguf(d / "tiny.gguf", model)
    tiny_gguf.write_tiny_gguf(d / "nan-weight.gguf", model, poison=("blk.0.attn_q.weight", math.nan))
    tiny_gguf.write_tiny_gguf(d / "nan-eps.gguf", model,
                              floats={"gemma3.attention.layer_norm_rms_epsilon": math.nan})
    shutil.copyfile(good, d / "sha256-5f2e6c0b")
    return d


# ----------------------------------------------------------------------------- export


def test_export_out_is_a_directory(capfd, tmp_path):
    out = tmp_path / "m.pte"
    out.mkdir()
    assert _error(capfd, ["export", "--preset", "tiny", "--out", str(out), "--quiet"]) == (
        f"fxport export: error: --out {out} is a directory; pass a file path, e.g. {out / 'model.pte'}")


def test_export_out_through_a_file(capfd, tmp_path):
    (tmp_path / "a.pte").write_bytes(b"x")
    out = tmp_path / "a.pte" / "b.pte"
    assert _error(capfd, ["export", "--preset", "tiny", "--out", str(out), "--quiet"]) == (
        f"fxport export: error: --out {out} goes through {tmp_path / 'a.pte'}, which is a file, not a folder; "
        "pass a path in an existing folder")


def test_export_out_in_a_read_only_folder():
    """Checked in a forked child that dropped root (root may write anywhere); refused before any work."""
    base = Path(tempfile.mkdtemp(prefix="fxport-ro-"))
    ro = base / "ro"
    try:
        os.chmod(base, 0o755)
        ro.mkdir()
        os.chmod(ro, 0o555)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.close(read)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                import io

                sys.stderr = io.StringIO()
                rc = main(["export", "--preset", "tiny", "--out", str(ro / "m.pte"), "--quiet"])
                os.write(write, f"{rc}\n{sys.stderr.getvalue()}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            rc, err = f.read().decode().split("\n", 1)
        os.waitpid(pid, 0)
        assert rc == "2"
        assert err.strip() == (f"fxport export: error: --out {ro / 'm.pte'}: folder {ro} is not writable; "
                               "pass a path in a writable folder or fix its permissions")
        assert _listing(ro) == []
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("name,message", [
    ("nan-weight.gguf", "tensor 'blk.0.attn_q.weight' has 1 NaN and 0 Inf value(s) of 256; the weights are corrupt "
                        "(a broken conversion or download): re-download or re-convert the checkpoint."),
    ("nan-eps.gguf", "GGUF metadata 'gemma3.attention.layer_norm_rms_epsilon' is nan; a model needs a finite value "
                     "here. The file is corrupt or was written by a broken converter: re-download or re-convert it."),
])
def test_export_refuses_non_finite_gguf_and_keeps_the_previous_program(capfd, tmp_path, gguf_dir, name, message):
    out = tmp_path / "m.pte"
    out.write_bytes(b"previous program")
    (tmp_path / "m.tokenizer").mkdir()
    (tmp_path / "m.tokenizer" / "tokenizer.json").write_text("{}")
    line = _error(capfd, ["export", "--gguf", str(gguf_dir / name), "--out", str(out), "--quiet"])
    assert line == f"fxport export: error: {gguf_dir / name}: {message}"
    assert out.read_bytes() == b"previous program"
    assert _listing(tmp_path) == ["m.pte", "m.tokenizer"] and _listing(tmp_path / "m.tokenizer") == ["tokenizer.json"]


def test_gguf_without_suffix_loads_as_gguf(capfd, gguf_dir):
    """An Ollama blob (no .gguf suffix) is recognized by its magic bytes."""
    assert main(["quantize", "--recipe", "default", "--gguf", str(gguf_dir / "sha256-5f2e6c0b")]) == 0
    out = capfd.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out
    assert out.strip().splitlines()[-1].endswith("weights quantized")


# ----------------------------------------------------------------------------- run: arguments


@pytest.mark.parametrize("option,value,message", [
    ("--temperature", "nan", "expected a finite number >= 0 (0 is greedy), got 'nan'"),
    ("--temperature", "inf", "expected a finite number >= 0 (0 is greedy), got 'inf'"),
    ("--temperature", "-0.5", "expected a finite number >= 0 (0 is greedy), got '-0.5'"),
    ("--temperature", "hot", "expected a number >= 0, got 'hot'"),
    ("--top-p", "0", "expected a number in (0, 1] (1 keeps every token), got '0'"),
    ("--top-p", "1.5", "expected a number in (0, 1] (1 keeps every token), got '1.5'"),
    ("--top-p", "nan", "expected a number in (0, 1] (1 keeps every token), got 'nan'"),
    ("--prompt-ids", "2,x,3", "expected comma-separated token ids such as 2,651,6037, got '2,x,3'"),
    ("--prompt-ids", ",", "expected at least one token id (e.g. 2,651), got ','"),
])
def test_run_rejects_bad_sampling_arguments(capfd, tmp_path, option, value, message):
    pte = tmp_path / "m.pte"
    pte.write_bytes(b"not even read")
    assert _error(capfd, ["run", str(pte), "--prompt-ids", "2", option, value]) == (
        f"fxport: error: argument {option}: {message} (see 'fxport run --help')")


# ----------------------------------------------------------------------------- run: the program


def test_run_prompt_id_outside_the_vocabulary(capfd, tiny_pte):
    assert _error(capfd, ["run", str(tiny_pte), "--prompt-ids", "2,17,256,4", "--threads", "1"]) == (
        "fxport run: error: generate: token id 256 (prompt position 2) is outside the program's vocabulary "
        "of 256 ids (0..255); pass token ids below 256.")


def test_run_tokenizer_of_another_model(capfd, tiny_pte, gguf_dir):
    """The tiny GGUF's tokenizer (264 ids) encodes 'ab' as [2, 262]: the 256-id program must refuse it."""
    assert _error(capfd, ["run", str(tiny_pte), "--tokenizer", str(gguf_dir / "tiny.gguf"), "--prompt", "ab",
                          "--threads", "1"]) == (
        "fxport run: error: generate: token id 262 (prompt position 1) is outside the program's vocabulary of "
        "256 ids (0..255); the tokenizer does not belong to this program (it has 264 ids): use the tokenizer the "
        "program was exported with (--tokenizer FILE.gguf|DIR, or re-export to write MODEL.tokenizer/ beside "
        "the program).")


def test_run_prompt_longer_than_the_context(capfd, tiny_pte):
    ids = ",".join(["7"] * 17)
    assert _error(capfd, ["run", str(tiny_pte), "--prompt-ids", ids, "--max-new-tokens", "4", "--threads", "1"]) == (
        "fxport run: error: generate: prompt of 17 tokens does not fit the program's context of max_seq_len=16 "
        "positions; shorten the prompt to fewer than 16 tokens (to leave room for new ones), or re-export with a "
        "larger context (fxport export --max-seq-len 20).")


def test_run_prompt_that_is_not_utf8(capfd, tiny_pte, gguf_dir):
    prompt = os.fsdecode(b"caf\xe9")  # what argv holds for a Latin-1 terminal's "café"
    assert _error(capfd, ["run", str(tiny_pte), "--tokenizer", str(gguf_dir / "tiny.gguf"), "--prompt", prompt,
                          "--threads", "1"]) == (
        "fxport run: error: generate: the prompt is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text "
        "(check the terminal's encoding) or token ids (--prompt-ids).")


def test_run_is_quiet_unless_verbose(capfd, tiny_pte):
    """The runtime's log lines (threadpool, cpuinfo) appear only with --verbose."""
    argv = ["run", str(tiny_pte), "--prompt-ids", "2,17", "--max-new-tokens", "2", "--threads", "1"]
    capfd.readouterr()
    assert main(argv) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[2 prompt tokens: "), err
    assert main([*argv, "--verbose"]) == 0
    err = capfd.readouterr().err
    assert "[threadpool.cpp:66] Resetting threadpool to 1 threads." in err


def test_run_process_prints_no_cpuinfo_lines(tiny_pte):
    """A fresh process is where ExecuTorch probes the CPU (5 cpuinfo lines on every run before)."""
    proc = subprocess.run([sys.executable, "-m", "fxport.cli", "run", str(tiny_pte), "--prompt-ids", "2,17",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() and all(t.isdigit() for t in proc.stdout.split())
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[2 prompt tokens: "), err


# ----------------------------------------------------------------------------- dump


def test_dump_files_that_are_not_programs(capfd, tmp_path, tiny_pte):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"garbage")
    assert _error(capfd, ["dump", str(garbage)]) == (
        f"fxport dump: error: {garbage} is not a program saved by torch.export.save (not a zip archive); "
        "pass a .pt2 written by torch.export.save or a .pte")
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("x.json", "{}")
    assert _error(capfd, ["dump", str(other_zip)]) == (
        f"fxport dump: error: {other_zip} is not a program saved by torch.export.save (file in archive is not in "
        "a subdirectory: x.json); pass a .pt2 written by torch.export.save or a .pte")
    renamed = tmp_path / "program.pt2"
    shutil.copyfile(tiny_pte, renamed)
    assert _error(capfd, ["dump", str(renamed)]) == (
        f"fxport dump: error: {renamed} is an ExecuTorch program, not a .pt2; name it *.pte to dump it as one")
    bad_pte = tmp_path / "bad.pte"
    bad_pte.write_bytes(b"\x00" * 64)
    assert _error(capfd, ["dump", str(bad_pte)]) == (
        f"fxport dump: error: {bad_pte} is not a loadable ExecuTorch program (no 'ET' file identifier at byte 4)")


def test_pte_backend_checks_ids_before_the_runtime(tiny_pte):
    """Direct library use: an id past the embedding table never reaches method->execute()."""
    import torch

    from fxport.runtime.generate import TokenIdError
    from fxport.runtime.pte_backend import PteBackend

    backend = PteBackend(tiny_pte, num_threads=1)
    with pytest.raises(TokenIdError) as e:
        backend.prefill(torch.tensor([[2, 300]]), torch.arange(2))
    assert str(e.value) == (f"token id 300 (prompt position 1) is outside the program's vocabulary of 256 ids "
                            f"(0..255); {tiny_pte} was exported for 256 ids.")
    with pytest.raises(TokenIdError, match=r"^token id -1 \(prompt position 0\)"):
        backend.decode(torch.tensor([[-1]]), torch.tensor([0]))
    assert backend.decode(torch.tensor([[255]]), torch.tensor([0])).shape[-1] == 256
