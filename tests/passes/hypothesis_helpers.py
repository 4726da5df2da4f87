"""Shared pieces of the passes' property tests (``test_*_hypothesis.py``).

* :data:`SETTINGS` / :func:`examples`: one hypothesis profile (no deadline, derandomized, no
  example database) so ``make test`` draws the same examples on every machine
  (``FXPORT_HYPOTHESIS_EXAMPLES=N`` draws N random ones instead);
* :func:`run_pass`: one pass through :func:`fxport.passes.apply` (normalized, validated after
  the pass, no dumps), returning the program and the pass's stats;
* :func:`assert_idempotent`: the pass run again on its own output changes nothing;
* :func:`ops`: call_function targets with their counts;
* :func:`expand_kv` / :data:`GQA_SPELLINGS`: the K/V head repetitions the attention passes peel;
* :func:`attention_fp64`: attention computed independently of aten SDPA, in float64;
* :func:`keep_mask`: a random bool mask in which every query row sees key 0.

Import as ``from fxport.tests.passes.hypothesis_helpers import ...`` (tests/conftest.py).
"""

from __future__ import annotations

import math
import os
from collections import Counter

import torch
from hypothesis import HealthCheck, settings
from torch.export import ExportedProgram

from fxport.passes import apply
from fxport.passes.pipeline import PassRecord

SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    """The shared profile with ``max_examples=n`` (keep each file's total run time under ~6 s).

    ``FXPORT_HYPOTHESIS_EXAMPLES=500`` (environment) searches deeper: that many random examples
    per test instead of ``n`` fixed ones, for a bug hunt outside ``make test``.
    """
    deep = os.environ.get("FXPORT_HYPOTHESIS_EXAMPLES")
    if deep:
        return settings(SETTINGS, max_examples=int(deep), derandomize=False)
    return settings(SETTINGS, max_examples=n)


def run_pass(ep: ExportedProgram, p, method: str | None = None) -> tuple[ExportedProgram, PassRecord]:
    """``p`` applied to ``ep`` through ``fxport.passes.apply``: (new program, the pass's record)."""
    result = apply(ep, [p], method=method, dump=False)
    (record,) = result.records
    return result.ep, record


def assert_idempotent(ep: ExportedProgram, p, method: str | None = None) -> None:
    """``p`` on its own output ``ep``: nothing changed, nothing rewritten, the same graph."""
    again, record = run_pass(ep, p, method)
    assert not record.changed and record.stats.rewritten == 0, record.stats.as_dict()
    assert str(again.graph) == str(ep.graph)


def ops(ep: ExportedProgram) -> Counter:
    """Counter of the call_function targets of ``ep``'s graph."""
    return Counter(n.target for n in ep.graph.nodes if n.op == "call_function")


GQA_SPELLINGS = ("repeat_kv", "repeat_interleave", "enable_gqa")


def expand_kv(x: torch.Tensor, n_rep: int, spelling: str) -> torch.Tensor:
    """(B, H_kv, S, D) -> what SDPA reads: (B, H_kv * n_rep, S, D) in repeat_kv head order, or
    ``x`` itself for ``"enable_gqa"`` / ``"direct"`` (SDPA repeats the heads itself)."""
    if spelling == "repeat_kv":  # transformers / fxport's model
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    if spelling == "repeat_interleave":  # ExecuTorch's Llama
        return x.repeat_interleave(n_rep, dim=1)
    if spelling in ("enable_gqa", "direct"):
        return x
    raise ValueError(f"expand_kv: unknown spelling {spelling!r}; use one of {GQA_SPELLINGS} or 'direct'")


def attention_fp64(q, k, v, mask=None, scale=None, is_causal=False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in float64, written without aten SDPA.

    q (B, H_q, L, D); k, v (B, H_kv, S, D|D_v) with query head h reading KV head h // n_rep;
    mask bool (True = attend) or additive, broadcastable to (B, H_q, L, S); ``is_causal``: key
    j attends query i iff j <= i (aten's top-left rule). Every row must see a key.
    """
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H_q, L, S)
    if is_causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


def keep_mask(shape, seed: int, valid=None) -> torch.Tensor:
    """Bool mask of ``shape`` (..., L, S): random holes, key 0 always seen; ``valid`` (one int per
    entry of dim 0, or None) hides every key at index >= valid[b] as a cache mask does."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < 0.6
    if valid is not None:
        S = shape[-1]
        limit = torch.tensor(valid).reshape(-1, *([1] * (len(shape) - 1)))
        keep = keep & (torch.arange(S) < limit)
    keep[..., 0] = True
    return keep


def additive(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float mask of a bool one: 0 where kept, -inf where hidden."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
