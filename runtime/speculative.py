"""Speculative decoding: a drafter proposes tokens, the target verifies them in one call.

    generate(program, tokenizer, prompt, n, speculative=PromptLookup(k=8))

Each round feeds the last emitted token and ``k`` drafted ones at positions ``pos .. pos + k`` to
the target's verify method (one call, logits of all ``k + 1`` tokens), keeps the drafted tokens
the target agrees with, and emits one token of the target's own after them (the correction at
the first disagreement, or a bonus token when all ``k`` agree). A round therefore emits 1 to
``k + 1`` tokens for one target call.

Exactness:

* greedy (``Sampler(temperature=0)``): a drafted token is kept iff it is the target's argmax
  at its position, so the output is exactly plain greedy decoding's (the logits of a verify row
  equal those of a one-token step up to float summation order: XNNPACK's GEMMs at M = k + 1 vs 1).
* sampling: standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
  a drafted token ``d`` with drafter probability ``q(d)`` is kept with probability
  ``min(1, p(d) / q(d))``; the first rejected one is replaced by a draw from
  ``norm(max(p - q, 0))``; after ``k`` kept ones a bonus token is drawn from ``p``. ``p`` is the
  target's distribution after the sampler's temperature / top-k / top-p, so the emitted tokens
  have exactly plain sampling's distribution. A drafter without probabilities (prompt lookup)
  has ``q = one-hot(d)``: keep with probability ``p(d)``, else draw from ``p`` with ``d`` removed.

Rollback of rejected positions: nothing is copied or cleared. The verify call wrote K/V for all
``k + 1`` fed tokens; after ``a`` kept drafts the next round starts at position
``pos' = pos + a + 1`` and overwrites the rejected positions ``pos' .. pos + k`` before reading
them (every call's positions are contiguous from ``pos'``; the causal mask hides positions after
the query). Full-length caches: position ``i`` lives in slot ``i``, so that is the whole story.
Ring buffers (:mod:`fxport.passes.ring_buffer_kv_cache`, R slots for window W, slot = position
mod R, a slot's position inferred from the call's last position ``q``: ``q - ((q - j) mod R)``):

* a rejected position ``r <= pos + k`` not yet rewritten sits in a slot the next call reads as
  position ``r - R`` (older than the call's positions); a query at ``t >= pos'`` sees positions
  ``> t - W``, and ``r - R <= pos + k - R <= pos' - W`` whenever ``R >= W + k`` (worst case
  ``a = 0``), so the stale entry is masked like any position out of the window;
* the rejected write destroyed the slot's previous content, position ``r - R``, which no query at
  ``t >= pos'`` needs, by the same inequality.

The builder sizes rings ``R >= W + C - 1`` for the chunk bound ``C`` (the verify method accepts
the prefill's chunks); a round feeds ``k + 1 <= C`` tokens, so ``R >= W + k`` holds. The test
(tests/runtime/test_speculative.py) checks every verify row against the eager full-cache model
after rejections, past the window and around the ring.

The target's verify: a backend's ``verify(tokens (1, L), input_pos (L,)) -> logits (1, L, V)``
(:class:`fxport.runtime.pte_backend.PteBackend` runs the program's ``target_verify`` method,
exported with ``fxport export --verify-method``); an eager model returns every token's logits
from its own forward. The name follows ExecuTorch's speculative-decoding RFC #19784 and the
EAGLE-3 PR stack (#20149-#20157: ``prefill``, ``target_verify``, ``draft_decode``); the
signature deviates: that ``target_verify`` returns the greedy argmax id per position and the
draft feature (greedy-only, EAGLE-3's hidden-state taps), this one the logits of every position,
which rejection sampling at temperature > 0 needs, and the runner contract's two inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from fxport import contract

from .eager_backend import EagerBackend
from .samplers import Sampler

__all__ = ["VERIFY", "Draft", "Drafter", "PromptLookup", "SpeculativeStats", "accept_draft", "verifier",
           "speculative_loop"]

VERIFY = contract.VERIFY  # the method name


@dataclass
class Draft:
    """Proposed tokens; ``probs`` (n, V): the drafter's distribution each was drawn from (None: a
    deterministic drafter, ``q = one-hot``)."""

    tokens: list[int]
    probs: Tensor | None = None


class Drafter(Protocol):
    """Proposes up to ``k`` tokens that follow ``context`` (prompt + emitted tokens)."""

    k: int

    def propose(self, context: Sequence[int], k: int) -> Draft: ...


@dataclass
class PromptLookup:
    """Draft-free prompt lookup (n-gram) drafting: find the context's last ``n`` tokens earlier in
    the context (``n`` from ``ngram_max`` down to ``ngram_min``) and propose the ``k`` tokens
    that followed the most recent occurrence that has ``k`` followers (else the one with the most).

    k: tokens drafted per round at most (the verify call feeds k + 1; at most the program's chunk - 1).
    adaptive: the draft length starts at k, grows by 2 after a round that kept every draft and
        after one that did not drops to one more than it kept (at least 1 less); when a one-token
        draft misses, the loop decodes plainly for 4, 16, 64 steps (while they keep missing) before
        drafting again: free text, where lookups mostly miss, runs near plain speed (a verify call
        of 2 / 5 / 9 tokens costs 1.1 / 1.2 / 1.4-1.6 one-token steps on the 270M at 2 threads).
    """

    k: int = 8
    ngram_max: int = 3
    ngram_min: int = 1
    # the loop's draft length follows acceptance (see speculative_loop); False: always up to k
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"PromptLookup: k={self.k} must be >= 1 (tokens drafted per verify call)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"PromptLookup: need 1 <= ngram_min ({self.ngram_min}) <= ngram_max ({self.ngram_max})")

    def propose(self, context: Sequence[int], k: int) -> Draft:
        ids = np.asarray(context, dtype=np.int64)
        n_ctx = len(ids)
        for n in range(min(self.ngram_max, n_ctx - 1), self.ngram_min - 1, -1):
            pattern = ids[n_ctx - n:]
            # starts of earlier occurrences (the suffix itself excluded): followers exist
            windows = np.lib.stride_tricks.sliding_window_view(ids[:n_ctx - 1], n)
            starts = np.flatnonzero((windows == pattern).all(axis=1))
            best: list[int] = []
            for s in starts[::-1]:  # most recent first
                follow = ids[s + n:s + n + k].tolist()
                if len(follow) > len(best):
                    best = follow
                if len(best) >= k:
                    break
            if best:
                return Draft(best)
        return Draft([])


@dataclass
class SpeculativeStats:
    """What a speculative generation did: ``rounds`` target verify calls, ``steps`` plain one-token
    calls (no draft), ``drafted`` / ``accepted`` drafted tokens proposed / kept."""

    rounds: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0  # time in the drafter

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_call(self) -> float:
        calls = self.rounds + self.steps
        return (self.accepted + calls) / calls if calls else float("nan")


def _target_probs(sampler: Sampler, logits: Tensor) -> Tensor:
    """(n, V) logits -> the distribution plain sampling draws from (temperature, top-k, top-p)."""
    return torch.softmax(sampler.filter(logits.float()), dim=-1)


def accept_draft(logits: Tensor, draft: Draft, sampler: Sampler) -> tuple[int, int]:
    """``(kept, token)``: how many drafted tokens to keep and the target's token after them.

    logits (n + 1, V): the target's logits for the fed token and the ``n`` drafted ones (row i
    predicts the token after fed token i). Greedy: keep while the drafted token is the argmax.
    Sampling: rejection sampling (module docstring), random numbers from ``sampler.generator``.
    """
    n = len(draft.tokens)
    if sampler.is_greedy:
        target = torch.argmax(logits, dim=-1).tolist()  # first index on ties, as plain greedy
        kept = 0
        while kept < n and draft.tokens[kept] == target[kept]:
            kept += 1
        return kept, int(target[kept])
    p = _target_probs(sampler, logits)  # (n + 1, V)
    gen = sampler.generator
    d = torch.tensor(draft.tokens, dtype=torch.long)
    rows = torch.arange(n)
    p_d = p[rows, d].tolist()
    q_d = [1.0] * n if draft.probs is None else draft.probs[rows, d].float().tolist()
    u = torch.rand(n + 1, generator=gen).tolist()  # one per draft, one for the token after them
    for i in range(n):
        if u[i] * q_d[i] < p_d[i]:  # keep with probability min(1, p(d) / q(d))
            continue
        if draft.probs is None:  # q = one-hot(d): the residual is p without d
            residual = p[i].clone()
            residual[d[i]] = 0.0
        else:
            residual = torch.clamp(p[i] - draft.probs[i].float(), min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q (to rounding): rejection had probability ~0
            residual = p[i]
        return i, _draw(residual, u[n])
    return n, _draw(p[n], u[n])


def _draw(weights: Tensor, u: float) -> int:
    """Inverse-CDF draw from unnormalized ``weights`` (V,) with uniform ``u`` in [0, 1)."""
    cdf = torch.cumsum(weights.double(), dim=0)
    # u * total < total (u < 1): the first index whose cdf exceeds it has positive weight
    return min(int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True)), weights.shape[0] - 1)


def verifier(backend: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The backend's ``(tokens (1, L), input_pos (L,)) -> logits (1, L, V)`` for every token.

    A backend with ``verify`` (:class:`~fxport.runtime.pte_backend.PteBackend` of a program with
    ``target_verify``); an :class:`~fxport.runtime.eager_backend.EagerBackend` (the eager model returns
    every token's logits). Else ValueError naming the fix.
    """
    if callable(getattr(backend, "verify", None)) and getattr(backend, "has_verify", True):
        return backend.verify
    if isinstance(backend, EagerBackend):
        return backend.prefill
    where = getattr(backend, "path", type(backend).__name__)
    raise ValueError(f"speculative decoding: {where} has no {VERIFY} method (logits of every token); "
                     "re-export it with `fxport export --verify-method` (BuildOptions(verify=True))")


def speculative_loop(backend: Any, drafter: Drafter, sampler: Sampler, prompt: Sequence[int], first: int,
                     result: Any, *, eos_ids: set, stop_ids: set, streamer: Any,
                     max_new_tokens: int) -> SpeculativeStats:
    """The decode phase of :func:`fxport.runtime.generate.generate` with ``speculative=drafter``.

    ``first``: the token sampled from the prompt's logits (not yet fed; the cache holds the
    prompt's ``len(prompt)`` positions). Appends to ``result.tokens`` with plain decoding's stop
    checks token by token (eos, stop ids, stop strings, ``max_new_tokens``), sets
    ``result.stop_reason`` / ``decode_s`` / ``decode_steps`` (tokens after the first, so
    ``decode_tok_s`` is generated tokens per second) and returns the round statistics.
    """
    if not isinstance(sampler, Sampler):
        raise ValueError(f"speculative decoding: sampler {type(sampler).__name__} is not a fxport Sampler; rejection "
                         "sampling needs its distribution (Sampler(temperature=, top_k=, top_p=, seed=))")
    verify = verifier(backend)
    if callable(getattr(backend, "load_verify", None)):
        backend.load_verify()  # not inside the timed loop
    stats = SpeculativeStats()
    max_seq_len = getattr(backend, "max_seq_len", None)
    k_max = min(int(drafter.k), int(backend.max_prefill_chunk) - 1)  # a round feeds k + 1 <= chunk tokens
    adaptive = bool(getattr(drafter, "adaptive", False))
    k_cur = k_max  # the draft length of the next round (adaptive: follows acceptance)
    cooldown, misses = 0, 0  # adaptive: plain steps left before drafting again; one-token rounds missed in a row
    context = list(prompt)
    pos = len(prompt)  # position of the next fed token
    t0 = time.perf_counter()

    def emit(token: int) -> bool:
        """Plain decoding's stop checks for one emitted token; True: stop."""
        result.tokens.append(token)
        context.append(token)
        if token in eos_ids:
            result.stop_reason = "eos"
        elif token in stop_ids:
            result.stop_reason = "stop_token"
        elif streamer.update(result.tokens):
            result.stop_reason = "stop_string"
        elif len(result.tokens) >= max_new_tokens:
            result.stop_reason = "max_new_tokens"
        else:
            return False
        return True

    done = emit(first)
    while not done:
        # after the fed token and n drafts, one more token comes: n <= tokens left - 1, and the
        # fed positions pos .. pos + n stay inside the cache
        room = max_new_tokens - len(result.tokens) - 1
        if max_seq_len is not None:
            room = min(room, int(max_seq_len) - 1 - pos)
        k = min(k_cur, room) if cooldown == 0 else 0
        cooldown = max(0, cooldown - 1)
        td = time.perf_counter()
        draft = drafter.propose(context, k) if k > 0 else Draft([])
        stats.draft_s += time.perf_counter() - td
        draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
        last = context[-1]
        if not draft.tokens:
            logits = backend.decode(torch.tensor([[last]], dtype=torch.long), torch.tensor([pos], dtype=torch.long))
            token = int(sampler(logits.reshape(-1, logits.shape[-1])[-1:].float())[0])
            stats.steps += 1
            pos += 1
            done = emit(token)
            continue
        n = len(draft.tokens)
        fed = torch.tensor([[last] + draft.tokens], dtype=torch.long)  # (1, n + 1)
        logits = verify(fed, torch.arange(pos, pos + n + 1, dtype=torch.long))
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] != n + 1:
            raise ValueError(f"speculative decoding: the verify method returned {logits.shape[0]} rows of logits "
                             f"for {n + 1} tokens; it must return every token's (a program without LastTokenLogits)")
        kept, token = accept_draft(logits.float(), draft, sampler)
        stats.rounds += 1
        stats.drafted += n
        stats.accepted += kept
        if adaptive:
            k_cur = min(k_max, k_cur + 2) if kept == n else max(1, min(k_cur - 1, kept + 1))
            misses = misses + 1 if n == 1 and kept == 0 else 0 if kept else misses
            if n == 1 and kept == 0:  # even one-token drafts miss: plain steps for a while (4, 16, 64)
                cooldown = min(64, 4 ** misses)
        pos += kept + 1  # positions past this are rejected: overwritten before read (module docstring)
        for t in draft.tokens[:kept] + [token]:
            if emit(t):
                done = True
                break
    result.decode_s = time.perf_counter() - t0
    result.decode_steps = len(result.tokens) - 1
    return stats


# ----------------------------------------------------------------------------- by name


def drafter_from_name(name: str, k: int = 8) -> Drafter:
    """``--speculative NAME``: ``lookup`` (:class:`PromptLookup`)."""
    if name == "lookup":
        return PromptLookup(k=k)
    raise ValueError(f"--speculative {name!r}: choose lookup (prompt lookup, no weights)")
