"""runtime.speculative_bench (``fxport bench --speculative``'s comparison), above both
runtime.generate and runtime.speculative: plain vs speculative greedy generation of one prompt on a
tiny eager model (its prefill is the verify call), the same tokens, and the one-row table."""

from __future__ import annotations

from fxport.runtime.generate import EagerBackend, generate
from fxport.runtime.speculative import PromptLookup
from fxport.runtime.speculative_bench import compare_with_plain, comparison_table
from fxport.tests.runtime.stock_runner_helpers import varied_tiny_model

PROMPT = [2, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]  # a repeated 5-gram for the lookup drafter


def test_compare_with_plain_on_an_eager_model():
    backend = EagerBackend(varied_tiny_model(max_seq_len=48))
    r = compare_with_plain(backend, None, PROMPT, 20, PromptLookup(k=4), repeats=2)
    plain = generate(backend, None, PROMPT, 20)
    assert r["identical"] is True and r["generated"] == len(plain.tokens) and r["prompt_tokens"] == len(PROMPT)
    stats = r["stats"]
    assert r["acceptance"] == stats.acceptance and r["tokens_per_call"] == stats.tokens_per_call >= 1.0
    assert r["ratio"] == r["spec_tok_s"] / r["plain_tok_s"]
    lines = comparison_table("tiny", r, "--speculative lookup k=4").splitlines()
    assert lines[0].split() == ["program", "plain", "tok/s", "spec", "tok/s", "ratio", "accepted", "tok/call",
                                "same", "tokens"]
    assert lines[1].split()[0] == "tiny" and lines[1].split()[-1] == "True"
    assert lines[2].startswith(f"(greedy, {len(PROMPT)} prompt tokens, {len(plain.tokens)} generated, ")
