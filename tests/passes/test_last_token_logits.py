"""LastTokenLogits: the output head reads only the last position of a prefill chunk."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.export import Dim, export

from fxport.passes.last_token_logits import LastTokenLogits

aten = torch.ops.aten
VOCAB, HIDDEN = 32, 16


class Head(nn.Module):
    """Embedding -> linear -> output head with a softcap (div, tanh, mul) before the output."""

    def __init__(self, head: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head = head

    def forward(self, tokens):
        x = torch.relu(self.mix(self.embed(tokens)))  # (B, L, H)
        if not self.head:
            return x.cumsum(1)  # not a per-position head: mixes positions
        return torch.tanh(self.lm_head(x) / 30.0) * 30.0  # (B, L, V)


@functools.lru_cache(maxsize=None)
def _programs(head: bool = True):
    torch.manual_seed(0)
    model = Head(head).eval()
    prefill = export(model, (torch.zeros(1, 5, dtype=torch.long),),
                     dynamic_shapes=({1: Dim("L", min=2, max=16)},)).run_decompositions({})
    decode = export(model, (torch.zeros(1, 1, dtype=torch.long),)).run_decompositions({})
    return prefill, decode


def test_prefill_logits_equal_the_last_row():
    prefill, _ = _programs()
    once = LastTokenLogits()(prefill)
    assert once.changed and (once.stats.matched, once.stats.rewritten) == (1, 1)
    (sl,) = [n for n in once.ep.graph.nodes if n.target is aten.slice.Tensor]
    assert sl.args[1:] == (1, -1, 9223372036854775807) and next(iter(sl.users)).target is aten.linear.default
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    want = prefill.module()(tokens)[:, -1:]
    got = once.ep.module()(tokens)
    assert got.shape == (1, 1, VOCAB)
    # the head is per position; BLAS blocks 1 row differently from 9: fp32 rounding only
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_idempotent_and_decode_left_alone():
    prefill, decode = _programs()
    once = LastTokenLogits()(prefill)
    twice = LastTokenLogits()(once.ep)
    assert not twice.changed and dict(twice.stats.skipped) == {"head input already has length 1": 1}
    res = LastTokenLogits()(decode)
    assert not res.changed and res.ep is decode
    assert dict(res.stats.skipped) == {"head input already has length 1": 1}


def test_output_without_a_linear_head_is_left_alone():
    prefill, _ = _programs(head=False)
    res = LastTokenLogits()(prefill)
    assert not res.changed
    assert dict(res.stats.skipped) == {"output is not a linear head through per-position ops": 1}


def test_contract_docstring():
    import fxport.passes.last_token_logits as mod

    assert all(word in mod.__doc__ for word in ("Matches", "Produces", "Leaves alone", "Invariant"))
