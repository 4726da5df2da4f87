"""generate(): chunked prefill + decode against a no-cache reference, exported programs, stop
conditions, streaming, context checks, statistics. Tiny preset models (random weights)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.runtime.generate import (
    ContextOverflowError,
    EagerBackend,
    ExportedBackend,
    generate,
)
from fxport.runtime.samplers import Sampler

S = 40  # cache length of the test models


def _model(preset: str = "tiny", seed: int = 0) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    m = Gemma4ForCausalLM(get_preset(preset), max_seq_len=S).eval()
    with torch.no_grad():  # larger logits so greedy paths vary (random init is near-uniform)
        m.lm_head.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny")


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_greedy(model: Gemma4ForCausalLM, prompt: list[int], n_new: int) -> list[int]:
    """No chunking, no decode path: every step re-runs one full forward from position 0."""
    seq, out = list(prompt), []
    for _ in range(n_new):
        model.reset_caches()
        logits = model(torch.tensor([seq]), torch.arange(len(seq)))  # (1, L, V)
        out.append(int(logits[0, -1].argmax()))
        seq.append(out[-1])
    return out


class CharTokenizer:
    """id i <-> chr(ord('a') + i % 26); eos_ids configurable; BOS = 0."""

    def __init__(self, eos_ids=()):
        self.eos_ids = tuple(eos_ids)

    def encode(self, text, add_bos=None):
        return [0] + [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


_REFERENCE: dict = {}  # n_prompt -> reference tokens (the prompt depends on n only)


@given(n_prompt=st.integers(1, 20), chunk=st.integers(1, 24))
@settings(max_examples=6, deadline=None)
def test_chunked_prefill_and_decode_equal_full_forward(tiny, n_prompt, chunk):
    prompt = _prompt(n_prompt, seed=n_prompt)
    if n_prompt not in _REFERENCE:
        _REFERENCE[n_prompt] = reference_greedy(tiny, prompt, 6)
    res = generate(tiny, None, prompt, 6, max_prefill_chunk=min(chunk, S))
    assert res.tokens == _REFERENCE[n_prompt]
    assert res.prefill_chunks == math.ceil(n_prompt / min(chunk, S))
    assert res.decode_steps == 5 and res.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_logits_match_full_forward(tiny, chunk):
    """Last-position logits after chunked prefill == one full forward (fp32; logits ~5, so
    atol 1e-4 / rtol 1e-5 allows only summation-order differences)."""
    prompt = _prompt(13)
    backend = EagerBackend(tiny, max_prefill_chunk=chunk)
    backend.reset()
    for s in range(0, 13, chunk):
        e = min(s + chunk, 13)
        logits = backend.prefill(torch.tensor([prompt[s:e]]), torch.arange(s, e))
    tiny.reset_caches()
    with torch.no_grad():
        full = tiny(torch.tensor([prompt]), torch.arange(13))
    torch.testing.assert_close(logits[0, -1], full[0, -1], atol=1e-4, rtol=1e-5)


def test_gemma3_preset_matches_reference():
    m = _model("tiny-gemma3", seed=3)
    prompt = _prompt(11, seed=5)
    assert generate(m, None, prompt, 10, max_prefill_chunk=4).tokens == reference_greedy(m, prompt, 10)


def test_exported_programs_generate_same_tokens_as_eager(tiny):
    from fxport.models.gemma4.export import export_methods

    progs = export_methods(tiny, max_prefill_chunk=8)
    backend = ExportedBackend(progs)
    assert (backend.max_seq_len, backend.max_prefill_chunk) == (S, 8)
    prompt = _prompt(19, seed=2)
    want = generate(tiny, None, prompt, 10, max_prefill_chunk=8).tokens
    got = generate(backend, None, prompt, 10)
    assert got.tokens == want
    assert got.prefill_chunks == 3  # 8 + 8 + 3
    # a second sequence on the same backend (stale cache entries are masked by position)
    assert generate(backend, None, prompt[:5], 6).tokens == reference_greedy(tiny, prompt[:5], 6)


class LastTokenBackend:
    """The smallest Backend: four members; prefill returns last-token logits only (1, 1, V)."""

    def __init__(self, model):
        self.model, self.max_seq_len, self.max_prefill_chunk = model, model.max_seq_len, 5

    @torch.no_grad()
    def prefill(self, tokens, input_pos):
        return self.model(tokens, input_pos)[:, -1:]

    @torch.no_grad()
    def decode(self, token, input_pos):
        return self.model(token, input_pos)[:, -1]  # (1, V) works too


def test_minimal_backend_protocol(tiny):
    prompt = _prompt(12, seed=4)
    res = generate(LastTokenBackend(tiny), None, prompt, 6)
    assert res.tokens == reference_greedy(tiny, prompt, 6)
    assert res.prefill_chunks == 3


def test_context_overflow_error_message(tiny):
    with pytest.raises(ContextOverflowError) as e:
        generate(tiny, None, _prompt(30), 12)
    assert str(e.value) == (
        "generate: prompt of 30 tokens + max_new_tokens=12 needs 41 cache positions but the "
        "backend holds max_seq_len=40; shorten the prompt, lower max_new_tokens to 11, or "
        "export with a larger max_seq_len."
    )
    # exactly at the limit: the last generated token is never fed back
    res = generate(tiny, None, _prompt(30), 11)
    assert len(res.tokens) == 11


def test_prefill_chunk_larger_than_backend_rejected(tiny):
    backend = EagerBackend(tiny, max_prefill_chunk=4)
    with pytest.raises(ValueError) as e:
        generate(backend, None, _prompt(6), 2, max_prefill_chunk=5)
    assert str(e.value) == (
        "generate: max_prefill_chunk=5 must be in [1, 4] (the backend's largest prefill chunk)."
    )


def test_eos_and_stop_token_end_generation(tiny):
    prompt = _prompt(7, seed=9)
    free = generate(tiny, None, prompt, 12).tokens
    k = free.index(free[-1])  # generation stops at the first occurrence of the stop id
    res = generate(tiny, CharTokenizer(eos_ids=[free[k]]), prompt, 12)
    assert res.tokens == free[: k + 1] and res.stop_reason == ("eos" if k < 11 else "max_new_tokens")
    res = generate(tiny, None, prompt, 12, stop=[free[k]])
    assert res.tokens == free[: k + 1]


def test_streaming_and_stop_strings(tiny):
    tok = CharTokenizer()
    prompt = "hello"
    full = generate(tiny, tok, prompt, 12)
    pieces = []
    res = generate(tiny, tok, prompt, 12, stream=pieces.append)
    assert "".join(pieces) == res.text == full.text == tok.decode(full.tokens)
    assert len(pieces) == 12  # one piece per token without stop strings
    stop = full.text[5:7]
    cut = full.text.find(stop)
    pieces = []
    res = generate(tiny, tok, prompt, 12, stop=[stop], stream=pieces.append)
    assert res.stop_reason == "stop_string"
    assert res.text == full.text[:cut] == "".join(pieces)
    assert res.tokens == full.tokens[: cut + 2]


def test_sampled_generation_is_seeded_and_stats_are_reported(tiny):
    prompt = _prompt(9)
    a = generate(tiny, None, prompt, 10, sampler=Sampler(temperature=1.0, top_k=20, seed=1))
    b = generate(tiny, None, prompt, 10, sampler=Sampler(temperature=1.0, top_k=20, seed=1))
    assert a.tokens == b.tokens
    assert a.prefill_s > 0 and a.decode_s > 0 and a.decode_steps == 9
    assert math.isfinite(a.prefill_tok_s) and math.isfinite(a.decode_tok_s)
    assert a.prefill_tok_s == pytest.approx(9 / a.prefill_s)
    assert a.decode_tok_s == pytest.approx(9 / a.decode_s)


def test_unsupported_program_type_error():
    with pytest.raises(TypeError) as e:
        generate(42, None, [1], 1)
    assert str(e.value).startswith("generate: cannot run a int; pass an eager model")
