"""The ``fxport`` command line: help texts, one-line errors with exit status 2, and one real
export -> run / bench / dump round trip on a 1-layer preset."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from fxport.cli import build_parser, main

COMMANDS = ["export", "run", "dump", "bench", "quantize", "demo"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command, capsys):
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings or action.dest} has no help"
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            if action.help is not argparse.SUPPRESS:
                assert opt in out


# ----------------------------------------------------------------------------- errors


def test_bad_preset(capsys, tmp_path):
    line = _one_line_error(capsys, ["export", "--preset", "nope", "--out", str(tmp_path / "m.pte")])
    assert line.startswith("fxport export: error: unknown Gemma preset 'nope'; valid presets: ")
    assert "tiny-gemma3" in line


def test_missing_file(capsys, tmp_path):
    line = _one_line_error(capsys, ["run", str(tmp_path / "missing.pte"), "--prompt", "hi"])
    assert line == f"fxport: error: argument MODEL.pte: {tmp_path / 'missing.pte'} does not exist (see 'fxport run --help')"
    line = _one_line_error(capsys, ["export", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "m.pte")])
    assert line.endswith(f"argument --gguf: {tmp_path / 'x.gguf'} does not exist (see 'fxport export --help')")


def test_corrupt_pte(capsys, tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x00" * 100)
    line = _one_line_error(capsys, ["run", str(bad), "--prompt-ids", "1,2"])
    assert line.startswith(f"fxport run: error: {bad} is not a loadable ExecuTorch program")


def test_corrupt_pt2_and_gguf(capsys, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"garbage")
    line = _one_line_error(capsys, ["dump", str(bad)])
    assert line.startswith(f"fxport dump: error: {bad} is not a program saved by torch.export.save")
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    line = _one_line_error(capsys, ["export", "--gguf", str(gguf), "--out", str(tmp_path / "m.pte"), "--quiet"])
    assert line.startswith("fxport export: error: ")


def test_argument_errors(capsys, tmp_path):
    out = str(tmp_path / "m.pte")
    line = _one_line_error(capsys, ["export", "--preset", "tiny", "--out", out, "--quant", "int3"])
    assert line == ("fxport export: error: unknown --quant recipe 'int3' for --backend xnnpack; choose one of: "
                    "8da4w, 8da4w-head8, 8da8w, balanced, compact, default, sensitive")
    # the dropped 'fast' recipe (lowering/xnnpack_quant.py) is refused like any unknown name
    line = _one_line_error(capsys, ["export", "--preset", "tiny", "--out", out, "--quant", "fast"])
    assert line == ("fxport export: error: unknown --quant recipe 'fast' for --backend xnnpack; choose one of: "
                    "8da4w, 8da4w-head8, 8da8w, balanced, compact, default, sensitive")
    line = _one_line_error(capsys, ["quantize", "--recipe", "fast"])
    assert line == ("fxport quantize: error: unknown quantization recipe 'fast'; choose one of: "
                    "8da4w, 8da4w-head8, 8da8w, balanced, compact, default, sensitive")
    line = _one_line_error(capsys, ["export", "--preset", "tiny", "--gguf", __file__, "--out", out])
    assert "not allowed with argument" in line
    line = _one_line_error(capsys, ["export", "--preset", "tiny", "--out", out, "--max-seq-len", "0"])
    assert "expected a positive integer, got 0" in line
    line = _one_line_error(capsys, ["export", "--preset", "tiny", "--out", str(tmp_path / "m.bin")])
    assert line == f"fxport export: error: --out {tmp_path / 'm.bin'} must end in .pte"
    line = _one_line_error(capsys, ["frobnicate"])
    assert "invalid choice: 'frobnicate'" in line


def test_entry_point_never_shows_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fxport.cli", "dump", str(tmp_path / "nothing.pt2")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fxport: error: argument FILE: {tmp_path / 'nothing.pt2'} does not exist (see 'fxport dump --help')"
    )


# ----------------------------------------------------------------------------- dump .pt2


def test_dump_saved_pt2(capsys, tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.register_buffer("cache", torch.zeros(2, 3))

        def forward(self, x):
            self.cache.add_(1.0)
            return torch.relu(self.proj(x)) + self.cache

    path = tmp_path / "prog.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.randn(2, 4),)), str(path))
    assert main(["dump", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {path}\n")
    assert "signature: forward(x: float32[2, 4]) -> (float32[2, 3])" in out
    assert "  cache  float32[2, 3]  persistent" in out
    assert "  proj.weight  float32[3, 4]  parameter" in out
    assert "## op histogram" in out and "1  aten.relu.default" in out
    assert "## graph" in out


# ----------------------------------------------------------------------------- export / run / bench


@pytest.fixture(scope="module")
def exported(tiny_pte):
    """``fxport export`` of a 1-layer tiny-gemma3 (random weights, seed 0), 8da4w (conftest.py: shared
    with test_errors.py)."""
    return tiny_pte


def test_export_writes_a_program(exported, capsys):
    assert exported.stat().st_size > 0
    assert main(["dump", str(exported)]) == 0
    out = capsys.readouterr().out.splitlines()
    # one method: prefill (L dynamic in [1, 5]) also runs the decode steps
    # ExecuTorch's LLM-runner contract: get_max_seq_len = the prefill chunk, get_max_context_len = positions
    assert out[1] == ("methods: enable_dynamic_shape, get_activation_dtype, get_bos_id, get_eos_ids, "
                      "get_logits_to_keep_mode, get_max_context_len, get_max_seq_len, get_vocab_size, prefill, "
                      "use_kv_cache, use_sdpa_with_kv_cache")
    assert out[2:12] == ["get_max_seq_len: 5", "get_max_context_len: 16", "use_kv_cache: 1", "use_sdpa_with_kv_cache: 0",
                         "enable_dynamic_shape: 1", "get_eos_ids: [1]", "get_vocab_size: 256", "get_bos_id: 2",
                         "get_activation_dtype: 6", "get_logits_to_keep_mode: 1"]
    assert "prefill: inputs (1, 5), (5,) -> outputs (1, 1, 256) (max sizes)" in out
    assert out[-2:] == ["decode: runs through prefill, one token per call",
                        "ExecuTorch runner contract: ok (TextLLMRunner runs it)"]


def test_run_matches_the_quantized_eager_model(exported, capsys):
    """Greedy ids from ``fxport run`` equal the eager model's (same seed, same quantization)."""
    from fxport.lowering.xnnpack import quantize_for_xnnpack
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM
    from fxport.runtime.generate import generate

    prompt = [2, 17, 99, 4, 250, 31, 7]  # 7 tokens: two prefill chunks (5 + 2)
    assert main(["run", str(exported), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    ids = [int(t) for t in captured.out.split()]
    assert "tok/s prefill" in captured.err and "tok/s decode" in captured.err

    config = get_preset("tiny-gemma3")
    config = config.replace(num_hidden_layers=1, layer_types=config.layer_types[:1])
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config, max_seq_len=16).eval()
    quantize_for_xnnpack(model, "8da4w")
    eager = generate(model, None, prompt, 6).tokens
    # XNNPACK's int8 activation rounding may flip a near-tie late; the first tokens must agree.
    assert len(ids) == 6
    assert ids[:3] == eager[:3], (ids, eager)


def test_bench_prints_one_row(exported, capsys):
    assert main(["bench", str(exported), "--prompt-len", "7", "--new-tokens", "4", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["program", "runner", "prefill", "tok/s", "decode", "tok/s"]
    row = lines[1].split()
    assert row[:2] == [str(exported), "fxport"] and float(row[2]) > 0 and float(row[3]) > 0


def test_bench_rejects_too_long_runs(exported, capsys):
    line = _one_line_error(capsys, ["bench", str(exported), "--prompt-len", "12", "--new-tokens", "8"])
    assert line == ("fxport bench: error: --prompt-len 12 + --new-tokens 8 = 20 tokens exceed the program's "
                    "max_seq_len 16; pass --prompt-len 8 or less, or re-export with --max-seq-len 20 or more")
    line = _one_line_error(capsys, ["bench", str(exported), "--prompt-len", "4", "--new-tokens", "16"])
    assert line.endswith("max_seq_len 16; pass --new-tokens 12 or less, or re-export with --max-seq-len 20 or more")


def test_quantize_shows_an_xnnpack_recipe(capsys):
    """``fxport quantize --recipe NAME`` knows the recipes ``fxport export --quant`` takes."""
    assert main(["quantize", "--recipe", "8da4w-head8"]) == 0
    assert capsys.readouterr().out.splitlines() == ["8da4w-head8 (--backend xnnpack): int4 g32, head int8"]
    assert main(["quantize", "--recipe", "8da4w-head8", "--preset", "tiny-gemma3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(line.split(None, 1) for line in lines[1:-1])
    assert rows["model.embed_tokens.weight"] == "float"  # no embedding rule, no lookup from the head
    assert rows["lm_head.weight"] == "8da8w per-channel"  # the head's rule comes first
    assert rows["model.layers.0.mlp.up_proj.weight"] == "8da4w g32"
    assert rows["model.layers.3.self_attn.v_proj.weight"] == "8da4w g32"
    assert len(rows) == 44 and lines[-1] == "43 of 44 weights quantized"
