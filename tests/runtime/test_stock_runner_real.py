"""The real Gemma 3 270M program (the demo's: ``balanced``, 128-token prefill chunks, 1024
positions): ExecuTorch's stock ``TextLLMRunner``, in a fresh process, generates ``fxport run``'s
greedy text, 32 new tokens, on a short prompt and on one longer than a prefill chunk."""

from __future__ import annotations

import pytest

from fxport.builder import BuildOptions, Source, build
from fxport.models.gemma4.load import gemma3_270m_gguf
from fxport.models.gemma4.tokenizer import load_tokenizer
from fxport.runtime.generate import generate
from fxport.runtime.pte_backend import PteBackend

from fxport.tests.runtime.stock_runner_helpers import runner_in_fresh_process

SHORT = "The capital of France is"
LONG = ("The history of the city goes back to the Roman era, when a small settlement was founded on the banks "
        "of the river. Over the centuries it grew into a major center of trade, art and science, attracting "
        "merchants and scholars from all over the continent. Today it is known for its museums, its cathedral "
        "and its food. ") * 2
NEW = 32


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "gemma3-270m.pte"
    build(Source(gguf=gemma3_270m_gguf()), out, BuildOptions(quant="balanced", max_seq_len=1024, max_prefill_chunk=128))
    return out


def test_runner_generates_fxport_tokens_on_the_real_model(program):
    tokenizer = load_tokenizer(program.with_suffix(".tokenizer"))
    backend = PteBackend(program)
    assert backend.contract_problems() == []
    ours = [generate(backend, tokenizer, p, NEW) for p in (SHORT, LONG)]
    assert [len(g.prompt_tokens) for g in ours] == [6, 132]  # BOS included; 132 > 128: two prefill calls
    del backend
    theirs = runner_in_fresh_process(program, program.with_suffix(".tokenizer") / "tokenizer.json", [SHORT, LONG], NEW)
    assert [t["prompt_tokens"] for t in theirs] == [6, 132]
    for g, t in zip(ours, theirs):
        assert len(g.tokens) == NEW and len(t["pieces"]) == NEW
        assert t["text"] == tokenizer.decode(g.tokens)
    assert ours[0].text.startswith(" the capital of")  # a real answer, not degenerate repetition
