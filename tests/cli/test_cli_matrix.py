"""``fxport export`` for every backend x every recipe name it accepts, typed as a user types it.

The recipe names come from the code (:func:`fxport.lowering.xnnpack_quant.recipe_names`,
:func:`fxport.lowering.cuda.recipe_names`), plus float (no ``--quant``). Each command line is run
through the CLI's ``main`` in this process (one torch import for the whole matrix; the same
parser, builder and printing as the ``fxport`` command) and must either succeed or refuse with
its documented one-line message:

* xnnpack: writes the ``.pte`` (+ ``.ptd``), which loads in ExecuTorch's runtime and returns
  finite logits for a prompt chunk (float: equal to the eager model's within 1e-4);
* cuda ``--dry-run``: prints the partition report (methods and their inputs, delegated / not
  delegated nodes, weight and KV bytes), every node delegated, every int4 linear dispatched, and
  "runner contract: ok" (ExecuTorch's LLM-runner contract, :mod:`fxport.contract`);
* cuda without ``--dry-run`` on a machine without a GPU, xnnpack with ``--dry-run`` and each
  backend given the other's recipe names: refused before any work, one line, exit status 2.

One command goes through a fresh ``python -m fxport.cli`` process (the issue's command line).
The matrix uses a 1-layer tiny preset with 16 positions; its cost is ~1 min on 2 cores.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import torch

from fxport.cli import main
from fxport.lowering import cuda as cuda_backend
from fxport.lowering.xnnpack_quant import recipe_names as xnnpack_recipe_names

SOURCE = "--preset tiny-gemma3 --layers 1 --seed 0 --max-seq-len 16 --max-prefill-chunk 4 --quiet"
XNNPACK_RECIPES = [None, *xnnpack_recipe_names()]
CUDA_RECIPES = [None, *cuda_backend.recipe_names()]
NO_GPU = ("fxport export: error: --backend cuda compiles with AOTInductor on a CUDA GPU and none is visible; "
          "add --dry-run for the partition report on this machine")
XNNPACK_DRY_RUN = ("fxport export: error: --dry-run is a --backend cuda option (a partition report without a GPU); "
                   "--backend xnnpack builds on this CPU: drop --dry-run")


def _quant(recipe: str | None) -> str:
    return "" if recipe is None else f" --quant {recipe}"


def _fxport(capsys, command: str) -> tuple[int, list[str], list[str]]:
    """``fxport <command>`` in this process: (exit status, stdout lines, stderr lines)."""
    rc = main(shlex.split(command))
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.strip().splitlines()


def _refusal(capsys, command: str) -> str:
    rc, out, err = _fxport(capsys, command)
    assert (rc, out, len(err)) == (2, [], 1), (rc, out, err)
    return err[0]


def _eager_model():
    """The model ``--preset tiny-gemma3 --layers 1 --seed 0`` builds."""
    from fxport.builder import Source, load_source

    model, _ = load_source(Source(preset="tiny-gemma3", layers=1, seed=0), max_seq_len=16)
    return model


# ----------------------------------------------------------------------------- xnnpack


@pytest.mark.parametrize("recipe", XNNPACK_RECIPES, ids=lambda r: r or "float")
def test_xnnpack_export_loads_and_runs(recipe, tmp_path, capsys):
    from fxport.runtime.pte_backend import PteBackend

    out = tmp_path / "m.pte"
    rc, lines, err = _fxport(capsys, f"export {SOURCE} --backend xnnpack{_quant(recipe)} --out {out}")
    assert rc == 0, err
    assert any(line.startswith(f"wrote {out} (") for line in lines)
    assert lines[-1].startswith("  total ")  # the stage table ends the output
    program = PteBackend(out)
    assert (program.max_prefill_chunk, program.vocab_size) == (4, 256)
    tokens = torch.tensor([[2, 17, 101, 9]])
    logits = program.prefill(tokens, torch.arange(4))
    assert logits.shape[-1] == 256 and bool(torch.isfinite(logits).all())
    if recipe is None:  # float32: the eager model's last-position logits, up to fp32 rounding
        with torch.no_grad():
            want = _eager_model()(tokens, torch.arange(4))[:, -1]
        torch.testing.assert_close(logits.reshape(1, 256), want.reshape(1, 256), rtol=1e-4, atol=1e-4)


def test_xnnpack_refuses_the_dry_run(tmp_path, capsys):
    assert _refusal(capsys, f"export {SOURCE} --backend xnnpack --dry-run") == XNNPACK_DRY_RUN


# ----------------------------------------------------------------------------- cuda


def _int4_linears(recipe: str | None) -> int:
    """Linears ``recipe`` gives int4 on this preset (what Int4Dispatch must rewrite, per method)."""
    if recipe is None:
        return 0
    return len(cuda_backend.quantize_for_cuda(_eager_model(), recipe))


@pytest.mark.parametrize("recipe", CUDA_RECIPES, ids=lambda r: r or "float")
def test_cuda_dry_run_prints_the_partition_report(recipe, capsys):
    rc, lines, err = _fxport(capsys, f"export {SOURCE} --backend cuda --dry-run{_quant(recipe)}")
    assert rc == 0, err
    assert "CUDA dry run (partition only; AOTInductor compilation needs a GPU)" in lines
    i = lines.index("methods: prefill, decode")
    assert re.fullmatch(r"    prefill\(tokens \(1, (s\d+)<=4\) int64, input_pos \(\1<=4,\) int64\)", lines[i + 1])
    assert lines[i + 2] == "    decode(tokens (1, 1) int64, input_pos (1,) int64)"
    for method in ("prefill", "decode"):
        row = next(line for line in lines if line.startswith(f"{method}: "))
        assert re.fullmatch(rf"{method}: \d+ node\(s\) delegated to CudaBackend in 1 partition\(s\), 0 not delegated", row)
    # 1 sliding layer (window 4, ring 2 x 4 = 8 slots) of 1 KV head x 16 dims in fp32: 2 x 8 x 16 x 4 bytes
    assert any(re.fullmatch(r"weights: \d+ tensors, \d+ bytes \(\d+\.\d\d MiB\); KV cache \(mutable buffers\): "
                            r"2 tensors, 1024 bytes \(0\.00 MiB\)", line) for line in lines)
    assert "result: every node delegated" in lines
    assert "runner contract: ok" in lines  # ExecuTorch's LLM-runner contract (fxport.contract)
    assert ("constant methods: get_max_seq_len=4, get_max_context_len=16, use_kv_cache=1, use_sdpa_with_kv_cache=0, "
            "enable_dynamic_shape=1, get_eos_ids=[1], get_activation_dtype=6, get_logits_to_keep_mode=1, "
            "get_vocab_size=256, get_bos_id=2") in lines
    n = _int4_linears(recipe)
    for method in ("prefill", "decode"):
        row = next(line for line in lines if line.startswith(f"[{method}] 03 int4_dispatch: "))
        assert f"matched={n} rewritten={n} " in row
        if n:  # the dry run builds the preset on the meta device: no values to range-check
            assert f"'qdata range check not run on meta weights ([-8, 7] from quant_min/quant_max; site rewritten)': {n}" in row
    if recipe == "int4":
        assert n == 8  # every linear: q, k, v, o, gate, up, down and the head
    elif recipe is not None:
        assert n > 0


def test_the_issue_dry_run_on_the_full_tiny_preset(capsys):
    """The issue's command on ``--preset tiny`` (every Gemma 4 text feature: per-layer embeddings,
    KV sharing, ...), which failed in Int4Dispatch on the meta device."""
    rc, lines, err = _fxport(capsys, "export --preset tiny --backend cuda --quant int4 --dry-run --max-seq-len 64 "
                                     "--max-prefill-chunk 8 --quiet")
    assert rc == 0, err
    # int4 linears: 6 x (q, o, gate, up, down, per-layer input gate) + 4 k (2 layers share KV) + 3 v
    # (k_eq_v) + the per-layer model projection + the head; per_layer_projection (K = 8) stays float
    for method in ("prefill", "decode"):
        row = next(line for line in lines if line.startswith(f"[{method}] 03 int4_dispatch: "))
        assert row.startswith(f"[{method}] 03 int4_dispatch: changed=True matched=45 rewritten=45 ")
    assert {"result: every node delegated", "runner contract: ok"} <= set(lines)


def test_cuda_without_a_gpu_refuses(tmp_path, capsys):
    command = f"export {SOURCE} --backend cuda --quant int4 --out {tmp_path / 'm.pte'}"
    if torch.cuda.is_available():  # a GPU machine builds it (make test runs on CPU machines)
        rc, _, err = _fxport(capsys, command)
        assert rc == 0 and (tmp_path / "m.pte").is_file(), err
        return
    assert _refusal(capsys, command) == NO_GPU
    assert not (tmp_path / "m.pte").exists()


def test_the_issue_command_in_a_fresh_process(tmp_path):
    """The command line exactly as typed, in its own process (exit status 2, one line on stderr)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine compiles the program instead of refusing")  # make test runs without one
    argv = [sys.executable, "-m", "fxport.cli", "export", "--preset", "tiny", "--backend", "cuda", "--quant", "int4",
            "--out", str(tmp_path / "x.pte")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr.strip().splitlines()[-1:]) == (2, "", [NO_GPU])


# ----------------------------------------------------------------------------- each backend, the other's names


@pytest.mark.parametrize("backend,recipe", [("xnnpack", r) for r in CUDA_RECIPES if r not in XNNPACK_RECIPES]
                         + [("cuda", r) for r in XNNPACK_RECIPES if r not in CUDA_RECIPES])
def test_a_recipe_of_the_other_backend_is_refused(backend, recipe, tmp_path, capsys):
    names = XNNPACK_RECIPES[1:] if backend == "xnnpack" else CUDA_RECIPES[1:]
    where = "--dry-run" if backend == "cuda" else f"--out {tmp_path / 'm.pte'}"
    line = _refusal(capsys, f"export {SOURCE} --backend {backend} --quant {recipe} {where}")
    assert line == (f"fxport export: error: unknown --quant recipe {recipe!r} for --backend {backend}; "
                    f"choose one of: {', '.join(names)}")
