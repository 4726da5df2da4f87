"""Speculative decoding (fxport.runtime.speculative): the loop is exact.

A tiny Gemma 3-style model (2 sliding layers, window W = 4, 1 global layer; random weights)
exported through the builder with the ``target_verify`` method: prefill / verify chunks of up to
C = 5 tokens, so ring buffers of R = max(2W, W + C - 1) = 8 slots, and rounds of k + 1 <= 5 fed
tokens (R >= W + k). Generations run to position ~60: past the window and seven times around
the ring, with rounds that keep every draft, none, or some.

* greedy: the same tokens as plain greedy decoding (eager model and the program);
* every verify row equals the eager full-cache model's logits for its context (rejected writes
  never leak into a later round), 2e-5;
* sampling: rejection sampling keeps the target's distribution: one round on fixed logits
  (chi-square over 3000 draws, with and without drafter probabilities) and three tokens through
  ``generate`` on a bigram model (chi-square over its 125 / 27 sequences, exact probabilities).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from fxport.builder import BuildOptions, Source, build
from fxport.lowering.xnnpack import cpu_passes
from fxport.models.gemma4.export import export_methods
from fxport.runtime.generate import generate
from fxport.runtime.pte_backend import PteBackend
from fxport.runtime.samplers import Sampler
from fxport.runtime.speculative import Draft, PromptLookup, accept_draft, verifier

from fxport.tests.runtime.stock_runner_helpers import varied_tiny_model

CHUNK, POSITIONS, WINDOW = 5, 64, 4
PROMPT = [2, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]  # 13 ids with a repeated 5-gram
NEW = 48  # positions up to 13 + 48 - 1 = 60


class OracleDrafter:
    """Drafts the reference continuation with every ``wrong``-th drafted token replaced, so
    rounds keep all drafts (bonus token), none, or some."""

    def __init__(self, prompt_len: int, reference: list[int], k: int, wrong: int = 3):
        self.k, self.prompt_len, self.reference, self.wrong, self.count = k, prompt_len, reference, wrong, 0

    def propose(self, context, k):
        done = len(context) - self.prompt_len
        out = []
        for t in self.reference[done:done + k]:
            self.count += 1
            out.append((t + 1) % 256 if self.count % self.wrong == 0 else t)
        return Draft(out)


class Recording:
    """A backend whose verify calls are recorded: (fed tokens, first position, logits)."""

    def __init__(self, backend):
        self.inner, self.calls = backend, []
        self.max_seq_len, self.max_prefill_chunk = backend.max_seq_len, backend.max_prefill_chunk
        self.prefill, self.decode = backend.prefill, backend.decode

    def verify(self, tokens, input_pos):
        logits = self.inner.verify(tokens, input_pos)
        self.calls.append((tokens[0].tolist(), int(input_pos[0]), logits.reshape(-1, logits.shape[-1]).clone()))
        return logits


@pytest.fixture(scope="module")
def model():
    return varied_tiny_model(max_seq_len=POSITIONS, window=WINDOW)


@pytest.fixture(scope="module")
def program(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "tiny.pte"
    build(Source(model=model), out, BuildOptions(max_seq_len=POSITIONS, max_prefill_chunk=CHUNK, verify=True))
    return out


@pytest.fixture(scope="module")
def plain(model):
    return generate(model, None, PROMPT, NEW).tokens


def test_verify_method_is_opt_in():
    # the default build's pass sets and options are those of before the option
    assert set(cpu_passes(windows={"a": 4})) == {"prefill", "decode"}
    sets = cpu_passes(windows={"a": 4}, verify=True)
    assert [type(p).__name__ for p in sets["target_verify"]] == [
        type(p).__name__ for p in sets["prefill"] if type(p).__name__ != "LastTokenLogits"]
    assert "LastTokenLogits" in [type(p).__name__ for p in sets["prefill"]]
    assert "verify" not in BuildOptions().key() and BuildOptions(verify=True).key()["verify"] is True


def test_verify_method_returns_every_tokens_logits(model, program):
    backend = PteBackend(program)
    assert {"prefill", "target_verify"} <= set(backend.program.method_names)
    assert "decode" not in backend.program.method_names
    assert backend.contract_problems() == []  # ExecuTorch's runner still runs it
    model.reset_caches()
    tokens = torch.tensor([PROMPT[:5]])
    want = model(tokens, torch.arange(5))
    got = backend.verify(tokens, torch.arange(5))
    assert tuple(got.shape) == (1, 5, 256)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # prefill still returns last-token logits, from the same KV cache
    got_prefill = backend.prefill(torch.tensor([PROMPT[5:8]]), torch.arange(5, 8))
    assert tuple(got_prefill.shape) == (1, 1, 256)
    torch.testing.assert_close(got_prefill[0, -1], model(torch.tensor([PROMPT[5:8]]), torch.arange(5, 8))[0, -1],
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("k", [4, 2])
def test_greedy_equals_plain_decoding_through_the_program(program, plain, k):
    backend = PteBackend(program)
    assert generate(backend, None, PROMPT, NEW).tokens == plain
    drafter = OracleDrafter(len(PROMPT), plain, k=k)
    res = generate(backend, None, PROMPT, NEW, speculative=drafter)
    assert res.tokens == plain
    s = res.speculative
    assert s.rounds > 5 and 0 < s.accepted < s.drafted  # rounds with rejections and with acceptances
    assert len(PROMPT) + NEW - 1 > 7 * 8  # past the window and seven times around the ring of 8


def test_verify_rows_equal_the_eager_full_cache_model_after_rejections(model, program, plain, one_thread):
    rec = Recording(PteBackend(program))
    res = generate(rec, None, PROMPT, NEW, speculative=OracleDrafter(len(PROMPT), plain, k=4, wrong=2))
    assert res.tokens == plain
    seq = PROMPT + plain
    rejected_rounds = 0
    with torch.no_grad():
        for fed, pos, logits in rec.calls:
            rejected_rounds += fed[1:] != seq[pos + 1:pos + len(fed)]
            model.reset_caches()
            ctx = torch.tensor([seq[:pos] + fed])
            want = model(ctx, torch.arange(ctx.shape[1]))[0, pos:]
            torch.testing.assert_close(logits, want, atol=2e-5, rtol=0)
    assert len(rec.calls) > 10 and rejected_rounds > 5


def test_prompt_lookup_greedy_equals_plain(model, program, plain, one_thread):
    res = generate(PteBackend(program), None, PROMPT, NEW, speculative=PromptLookup(k=4))
    assert res.tokens == plain
    eager = generate(model, None, PROMPT, NEW, speculative=PromptLookup(k=8))
    assert eager.tokens == plain and eager.speculative.rounds > 0


def test_prompt_lookup_proposals():
    lookup = PromptLookup(k=3, ngram_max=2)
    # the last bigram (5, 6) occurs at 0 and 4: the most recent with 3 followers wins
    assert lookup.propose([5, 6, 1, 2, 5, 6, 3, 4, 9, 5, 6], 3).tokens == [3, 4, 9]
    # k = 4: the most recent (5, 6) has 3 followers (3, 5, 6), the older one 4
    assert lookup.propose([5, 6, 1, 2, 5, 6, 3, 5, 6], 4).tokens == [1, 2, 5, 6]
    assert lookup.propose([5, 6, 1, 2, 5, 6, 3, 5, 6], 3).tokens == [3, 5, 6]
    assert lookup.propose([7, 1, 2, 3, 7], 2).tokens == [1, 2]  # unigram fallback
    assert lookup.propose([1, 2, 3], 3).tokens == []
    with pytest.raises(ValueError, match=r"k=0 must be >= 1"):
        PromptLookup(k=0)


def test_a_program_without_verify_is_refused_with_the_fix(tmp_path):
    class NoVerify:
        max_seq_len, max_prefill_chunk, path = 64, 5, "x.pte"

        def prefill(self, t, p): ...

        def decode(self, t, p): ...

    with pytest.raises(ValueError, match=r"x\.pte has no target_verify method .*`fxport export --verify-method`"):
        verifier(NoVerify())


# ----------------------------------------------------------------------------- sampling


def _first_two(logits, q, first_draft, sampler, n, g):
    """Empirical first-token counts and second-token counts given the first is a kept draft.
    With drafter probabilities ``q`` (2, V) each trial draws its drafts from q (as a drafter does);
    without, the drafts are fixed: ``[first_draft, 1]``."""
    V = logits.shape[-1]
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        tokens = [first_draft, 1] if q is None else torch.multinomial(q, 1, generator=g).flatten().tolist()
        kept, token = accept_draft(logits, Draft(tokens, q), sampler)
        emitted = tokens[:kept] + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return first, second


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_q, one_thread):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=g) * 1.5
    sampler = Sampler(temperature=0.8, seed=2)
    p = torch.softmax(logits / 0.8, dim=-1)
    q = torch.softmax(torch.randn(2, 6, generator=g), dim=-1) if with_q else None
    n = 3000
    first, second = _first_two(logits, q, int(torch.argmax(p[0])), sampler, n, g)
    assert chisquare(first, p[0] * n).pvalue > 1e-3
    assert chisquare(second, p[1] * second.sum()).pvalue > 1e-3
    assert n // 10 < second.sum() < n * 0.9  # kept and rejected both happened
    # the test can fail: a draft kept without the ratio test moves the first token's distribution
    naive = torch.zeros(6)
    naive[int(torch.argmax(p[0]))] = n
    assert chisquare(naive + 1, p[0] * (naive + 1).sum()).pvalue < 1e-6


class BigramLM:
    """A tiny language model without a network: logits = T[position parity, fed token]
    (vocab 5), every row returned; exact sequence probabilities are products of its rows."""

    max_seq_len, max_prefill_chunk, vocab_size = 64, 6, 5

    def __init__(self):
        self.table = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(4)) * 1.5

    def prefill(self, tokens, input_pos):
        return self.table[input_pos % 2, tokens[0]][None]  # (1, L, V)

    decode = verify = prefill


class GuessDrafter:
    """Drafts k tokens from a fixed distribution q (returned with them): kept, partly kept and
    rejected rounds all happen."""

    k = 2

    def __init__(self, q):
        self.q, self.g = q, torch.Generator().manual_seed(3)

    def propose(self, context, k):
        tokens = torch.multinomial(self.q, k, replacement=True, generator=self.g).tolist()
        return Draft(tokens, self.q.expand(k, -1))


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampled_generation_has_the_plain_distribution(top_k, one_thread):
    """Three tokens after a prompt at temperature 0.9: every sequence's frequency (2000 runs
    through generate) against its exact probability."""
    lm, prompt, n = BigramLM(), [0, 3], 2000
    sampler_args = dict(temperature=0.9, top_k=top_k)
    f = Sampler(**sampler_args).filter
    exact = {}
    p1 = torch.softmax(f(lm.table[1, 3][None]), -1)[0]  # after token 3 at position 1
    for a, b, c in itertools.product(range(5), repeat=3):
        p2 = torch.softmax(f(lm.table[0, a][None]), -1)[0]
        p3 = torch.softmax(f(lm.table[1, b][None]), -1)[0]
        exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    drafter = GuessDrafter(torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1]))
    counts = dict.fromkeys(exact, 0)
    kept = drafted = 0
    for i in range(n):
        res = generate(lm, None, prompt, 3, sampler=Sampler(**sampler_args, seed=100 + i), speculative=drafter)
        counts[tuple(res.tokens)] += 1
        kept, drafted = kept + res.speculative.accepted, drafted + res.speculative.drafted
    cells = [s for s in exact if exact[s] > 0]
    assert sum(counts[s] for s in cells) == n  # nothing outside top-k's support
    observed = torch.tensor([counts[s] for s in cells], dtype=torch.float64)
    expected = torch.tensor([exact[s] for s in cells], dtype=torch.float64) * n
    assert chisquare(observed, expected * (n / expected.sum())).pvalue > 1e-3
    assert 0.2 < kept / drafted < 0.8


# ----------------------------------------------------------------------------- CLI


def test_cli_run_speculative_prints_plain_greedy_ids(program, plain, capsys):
    from fxport.cli import main

    ids = ",".join(map(str, PROMPT))
    assert main(["run", str(program), "--prompt-ids", ids, "--max-new-tokens", "20", "--speculative", "lookup",
                 "--draft-k", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in plain[:20]]
    assert "[speculative lookup k=4: " in err and "tokens per target call]" in err


def test_cli_speculative_needs_the_verify_method():
    import argparse

    from fxport.cli import UsageError, _speculative

    class Plain:  # a loaded program without target_verify (PteBackend.has_verify False)
        has_verify = False

    args = argparse.Namespace(speculative="lookup", draft_k=8, model="plain.pte", image=None)
    with pytest.raises(UsageError, match=r"^--speculative: plain\.pte has no target_verify method; re-export it "
                                         r"with fxport export --verify-method$"):
        _speculative(args, Plain())
    assert _speculative(argparse.Namespace(speculative=None), Plain()) is None
