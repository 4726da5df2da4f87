"""ExecuTorch's stock ``TextLLMRunner`` runs what ``fxport`` writes and generates ``fxport run``'s tokens.

A tiny Gemma 3-style model (2 sliding layers with window 4 -> ring buffers of 8 slots, 1 global
layer; untied head, random weights) with a real ``tokenizers`` tokenizer, exported through the
builder: prefill chunks of up to 5 tokens, 64 positions. The runner runs in a fresh process
(its own kernel registry), as an app would.
"""

from __future__ import annotations

import pytest
import torch

from fxport import contract
from fxport.builder import BuildOptions, Source, build
from fxport.models.gemma4.config import FULL, get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.runtime.generate import generate
from fxport.runtime.pte_backend import PteBackend, PteError

from fxport.tests.runtime.stock_runner_helpers import runner_in_fresh_process, tiny_tokenizer, varied_tiny_model

CHUNK, POSITIONS, WINDOW = 5, 64, 4
SHORT = "hello"  # 5 ids with BOS: one prefill call
LONG = "hello world, the cat sat on the mat"  # 25 ids with BOS: 5 prefill calls
NEW = 30  # 55 positions at most: past the window (4) and the ring (8), inside the context (64)
NEAR_END = LONG + ", and then the dog sat on it"  # 44 ids: 30 new tokens would pass the 64 positions


@pytest.fixture(scope="module")
def program_build(tmp_path_factory):
    """The tiny program with default options: (path, tokenizer, BuildResult)."""
    tokenizer = tiny_tokenizer()
    out = tmp_path_factory.mktemp("runner") / "tiny.pte"
    result = build(Source(model=varied_tiny_model(max_seq_len=POSITIONS, window=WINDOW), tokenizer=tokenizer), out,
                   BuildOptions(max_seq_len=POSITIONS, max_prefill_chunk=CHUNK))
    return out, tokenizer, result


@pytest.fixture(scope="module")
def program(program_build):
    return program_build[:2]


@pytest.fixture(scope="module")
def runner_out(program):
    out, _ = program
    tok_json = out.with_suffix(".tokenizer") / "tokenizer.json"
    with_bos = runner_in_fresh_process(out, tok_json, [SHORT, LONG, NEAR_END], NEW)
    without_bos = runner_in_fresh_process(out, tok_json, [SHORT, "<bos>" + LONG], NEW, num_bos=0)
    return with_bos, without_bos


def test_program_carries_the_runner_contract(program):
    backend = PteBackend(program[0])
    assert backend.contract_problems() == []
    assert backend.metadata == {
        "get_max_seq_len": CHUNK, "get_max_context_len": POSITIONS, "use_kv_cache": 1, "use_sdpa_with_kv_cache": 1,
        "enable_dynamic_shape": 1, "get_eos_ids": [1], "get_vocab_size": 256, "get_bos_id": 2,
        "get_activation_dtype": 6, "get_logits_to_keep_mode": 1}
    assert (backend.max_prefill_chunk, backend.max_seq_len, backend.eos_ids) == (CHUNK, POSITIONS, (1,))


def test_runner_prompt_ids_equal_fxport_ids(program, runner_out):
    _, tokenizer = program
    with_bos, without_bos = runner_out
    assert [g["prompt_tokens"] for g in with_bos[:2]] == [len(tokenizer.encode(SHORT)), len(tokenizer.encode(LONG))] == [5, 25]
    # ExecuTorch 1.5.1's HFTokenizer adds BOS only when asked (num_bos=1): without it, one id fewer,
    # unless the prompt text starts with "<bos>" (as apps' chat templates write it): then fxport adds none
    assert without_bos[0]["prompt_tokens"] == len(tokenizer.encode(SHORT, add_bos=False)) == 4
    assert without_bos[1]["prompt_tokens"] == len(tokenizer.encode("<bos>" + LONG)) == 25
    assert tokenizer.encode("<bos>" + LONG) == tokenizer.encode(LONG)


def test_runner_with_default_num_bos_and_a_bos_prompt_generates_fxport_tokens(program, runner_out):
    out, tokenizer = program
    ours = generate(PteBackend(out), tokenizer, "<bos>" + LONG, NEW)
    assert runner_out[1][1]["text"] == tokenizer.decode(ours.tokens)


@pytest.mark.parametrize("index, prompt", [(0, SHORT), (1, LONG)])
def test_runner_generates_fxport_tokens(program, runner_out, index, prompt):
    """Greedy text of the stock runner == ``fxport run``'s, through chunked prefill (LONG: 5
    chunks) and decode past the sliding window and the ring size."""
    out, tokenizer = program
    ours = generate(PteBackend(out), tokenizer, prompt, NEW)
    theirs = runner_out[0][index]
    assert len(set(ours.tokens)) >= 8  # the model wanders: equality is not one repeated token
    n_positions = len(ours.prompt_tokens) + len(ours.tokens)
    assert n_positions > 2 * WINDOW
    assert theirs["text"] == tokenizer.decode(ours.tokens)
    assert len(theirs["pieces"]) == len(ours.tokens)


def test_program_from_before_the_contract_is_refused(tmp_path):
    """A .pte with the pre-contract metadata (get_max_prefill_chunk, no get_max_context_len)."""
    from fxport.tests.lowering.helpers import lower_fast
    from fxport.models.gemma4.export import export_methods

    model = Gemma4ForCausalLM(get_preset("tiny-gemma3").replace(num_hidden_layers=1, layer_types=[FULL]), max_seq_len=16)
    with torch.no_grad():
        programs = export_methods(model, max_prefill_chunk=CHUNK, methods=("prefill",))
    old = {"get_max_seq_len": 16, "get_max_prefill_chunk": CHUNK, "get_vocab_size": 256, "get_bos_id": 2,
           "get_eos_id": 1}
    path = lower_fast(programs, constant_methods=old).save(tmp_path / "old.pte")
    with pytest.raises(PteError) as err:
        PteBackend(path)
    assert str(err.value) == f"{path} {contract.REEXPORT_HINT}"


def test_cli_run_with_the_stock_runner_prints_fxport_text(program, capsys):
    """``fxport run --runner executorch`` (in this process) prints what ``fxport run`` prints."""
    from fxport.cli import main

    out, _ = program
    argv = ["run", str(out), "--prompt", LONG, "--max-new-tokens", "12", "--no-stream"]
    assert main(argv) == 0
    ours = capsys.readouterr().out
    assert main(argv + ["--runner", "executorch"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.out == ours
    assert captured.err.startswith("[ExecuTorch TextLLMRunner: 25 prompt tokens: ")
    assert main(["run", str(out), "--prompt", LONG, "--runner", "executorch", "--top-k", "3"]) == 2
    assert capsys.readouterr().err == ("fxport run: error: --runner executorch takes a text --prompt and --temperature "
                                       "only; drop --top-k (or use --runner fxport)\n")


def test_cli_bench_with_the_stock_runner(program, capsys):
    from fxport.cli import main

    out, _ = program
    assert main(["bench", str(out), "--runner", "executorch", "--prompt-len", "12", "--new-tokens", "45"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:2] == ["program", "runner"]
    fields = row.split()
    assert fields[:2] == [str(out), "executorch"] and float(fields[2]) > 0 and float(fields[3]) > 0


def test_runner_past_the_context_length_fails_loudly(program, runner_out):
    """ExecuTorch 1.5.1's runner caps max_new_tokens by get_max_context_len without counting the
    prompt ("Max new tokens resolved: 30, given pos_ 44, ... max_context_len 64"), so 30 new
    tokens after 44 prompt ids reach position 64. The program then stops with the kernel's error
    (the RoPE table has 64 rows), never with wrong text."""
    _, tokenizer = program
    assert len(tokenizer.encode(NEAR_END)) == 44
    assert runner_out[0][2]["error"].endswith(
        "Generation failed: Check failed (index_ptr[i] >= 0 && index_ptr[i] < nonempty_size(in, dim)): "
        "index[0] = 64 is out of range [0, 64) [method.cpp:1493] arg 4 with type id 1")


def test_the_default_uses_custom_sdpa_and_no_custom_sdpa_runs_in_the_runner_too(program_build, tmp_path):
    """The default program (the module's ``program``, whose runner tests are above) calls
    ``llama::custom_sdpa`` for the global layer (the ring-buffer layers stay on XNNPACK), whose
    query and key heads QKNormRopeAsOne normalizes and rotates as one, and says
    so in ``use_sdpa_with_kv_cache``; ``--no-custom-sdpa`` (``BuildOptions(custom_sdpa=False)``)
    keeps every attention in XNNPACK, says 0, and the stock runner, in a fresh process, greedily
    generates ``fxport run``'s tokens through chunked prefill and decode past the ring."""
    cs = program_build[2].pass_results["prefill"]["custom_sdpa"].stats
    assert (cs.matched, cs.rewritten) == (3, 1)
    assert dict(cs.skipped) == {"cache written at computed positions (e.g. a ring buffer)": 2}
    qk = program_build[2].pass_results["prefill"]["qk_norm_rope_as_one"].stats  # on custom_sdpa's layer
    assert (qk.matched, qk.rewritten, dict(qk.skipped)) == (1, 1, {})
    tokenizer = tiny_tokenizer()
    out = tmp_path / "tiny-no-custom-sdpa.pte"
    result = build(Source(model=varied_tiny_model(max_seq_len=POSITIONS, window=WINDOW), tokenizer=tokenizer), out,
                   BuildOptions(max_seq_len=POSITIONS, max_prefill_chunk=CHUNK, custom_sdpa=False))
    assert "custom_sdpa" not in [r.name for r in result.pass_results["prefill"].records]
    backend = PteBackend(out)
    assert backend.metadata["use_sdpa_with_kv_cache"] == 0 and backend.contract_problems() == []
    ours = generate(backend, tokenizer, LONG, NEW)
    assert len(set(ours.tokens)) >= 8
    theirs = runner_in_fresh_process(out, out.with_suffix(".tokenizer") / "tokenizer.json", [LONG], NEW)[0]
    assert theirs["text"] == tokenizer.decode(ours.tokens)


def test_custom_sdpa_is_an_xnnpack_option_on_by_default():
    with pytest.raises(ValueError, match="custom_sdpa is an xnnpack option; --backend cuda has its own attention"):
        BuildOptions(backend="cuda", custom_sdpa=True)
    assert BuildOptions().custom_sdpa is True and BuildOptions(backend="cuda").custom_sdpa is False
    assert BuildOptions(custom_sdpa=False).custom_sdpa is False
    # the CLI: on unless --no-custom-sdpa
    from fxport.cli import build_parser

    export = lambda *a: build_parser().parse_args(["export", "--preset", "tiny-gemma3", *a])  # noqa: E731
    assert [export().custom_sdpa, export("--custom-sdpa").custom_sdpa, export("--no-custom-sdpa").custom_sdpa] == [
        None, True, False]
