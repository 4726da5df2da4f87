"""LastTokenLogits on drawn output heads: batch, chunk length (static or dynamic), hidden and
vocab sizes, bias, the per-position ops between the head and the output (softcap, softmax,
casts, ...), a second output, torchao's dynamically quantized head input (8da8w, as the
XNNPACK recipe exports it), and heads it must leave alone (a position-mixing op after the head,
a rank-2 head input, a decode step of length 1).

Expected from the contract: matched / rewritten / skip reason; the rewritten logits are
(B, 1, V) and equal the unrewritten program's last row within BLAS rounding (and, for float
heads, an fp64 recomputation of the head); the other outputs are unchanged; a second run
changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from torch.export import Dim

from fxport.passes import LastTokenLogits

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, ops, run_pass

aten = torch.ops.aten
#: value-preserving per-position tails (x -> y), each in the pass's PER_POSITION set.
#: Tails that mix positions must stop the rewrite: a softmax over the sequence dim, and a 0-d
#: operand computed from the logits (``y / y.abs().max()``); both were rewritten before (silently
#: 1.0 everywhere / the max of the last row only) and are drawn below in ALONE.
TAILS = {
    "softcap": lambda x: torch.tanh(x / 30.0) * 30.0,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
    "double": lambda x: x.double(),
    "clone": lambda x: x.clone(),
    "scale by a 0-d tensor": lambda x: x * torch.tensor(0.5),
}
#: heads the pass must leave alone -> its skip reason
ALONE = {
    "cumsum after the head": "output is not a linear head through per-position ops",
    "softmax over positions": "output is not a linear head through per-position ops",
    "log_softmax over positions": "output is not a linear head through per-position ops",
    "divide by the logits' max": "output is not a linear head through per-position ops",
    "rank-2 head input": "head input is not rank 3 (B, L, H)",
    "decode step": "head input already has length 1",
}


class Head(nn.Module):
    def __init__(self, H, V, bias, tails, alone, extra_output, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=bias)
        self.tails, self.alone, self.extra_output = tails, alone, extra_output

    def forward(self, x):  # (B, L, H)
        h = torch.relu(self.mix(x))
        if self.alone == "rank-2 head input":
            h = h[0]  # (L, H)
        y = self.lm_head(h)
        for t in self.tails:
            y = TAILS[t](y)
        if self.alone == "cumsum after the head":
            y = y.cumsum(-2)
        elif self.alone == "softmax over positions":
            y = torch.softmax(y, dim=-2)
        elif self.alone == "log_softmax over positions":
            y = torch.log_softmax(y, dim=1 if y.dim() == 3 else 0)
        elif self.alone == "divide by the logits' max":
            y = y / y.abs().max()
        return (y, h * 2) if self.extra_output else y


def _quantize_head(model):
    from torchao.quantization import quantize_

    from fxport.lowering.xnnpack_quant import XnnpackWeightQuant

    config = XnnpackWeightQuant(bits=8, group_size=None).torchao_config()
    quantize_(model, config, filter_fn=lambda m, fqn: fqn == "lm_head")


@examples(8)
@given(B=st.sampled_from([1, 2]), L=st.integers(2, 6), dynamic=st.booleans(), H=st.sampled_from([4, 8]),
       V=st.sampled_from([5, 16]), bias=st.booleans(), tails=st.lists(st.sampled_from(sorted(TAILS)), max_size=3),
       alone=st.sampled_from([None, None, None, *ALONE]), extra_output=st.booleans(),
       quantized=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_the_head_reads_the_last_position_only(B, L, dynamic, H, V, bias, tails, alone, extra_output, quantized, seed):
    if alone == "decode step":
        L, dynamic = 1, False
    model = Head(H, V, bias, tails, alone, extra_output, seed).eval()
    if quantized:
        _quantize_head(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, generator=g)
    shapes = ({1: Dim("L", min=2, max=9)},) if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    new, rec = run_pass(ep, LastTokenLogits())
    event(f"{'8da8w' if quantized else 'float'} head, {alone or 'rewritten'}")

    if alone is not None:
        assert (rec.changed, rec.stats.rewritten, dict(rec.stats.skipped)) == (False, 0, {ALONE[alone]: 1})
        assert rec.stats.matched == int(ALONE[alone] != "output is not a linear head through per-position ops")
        return
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (True, 1, 1, {})
    (sl,) = [n for n in new.graph.nodes if n.target is aten.slice.Tensor and n.args[1:3] == (1, -1)]
    readers = {u.target for u in sl.users}
    assert readers == ({aten.linear.default} if not quantized else  # before torchao's q/dq chain
                       {torch.ops.torchao.choose_qparams_affine.default, torch.ops.torchao.quantize_affine.default})
    assert ops(new)[aten.linear.default] == ops(ep.run_decompositions({}))[aten.linear.default]

    for length in ([L, 9] if dynamic else [L]):
        x = torch.randn(B, length, H, generator=g)
        got, ref = new.module()(x), ep.module()(x)
        got, ref = (got, ref) if extra_output else ((got,), (ref,))
        assert got[0].shape == (B, 1, V) and got[0].dtype == ref[0].dtype
        # the head is per position; BLAS blocks 1 row differently from L (fp32 rounding only)
        torch.testing.assert_close(got[0], ref[0][:, -1:], rtol=1e-5, atol=1e-6)
        if extra_output:
            assert torch.equal(got[1], ref[1])  # the other output keeps every position
        if not quantized:
            with torch.no_grad():
                want = F.linear(torch.relu(F.linear(x.double(), model.mix.weight.double(), model.mix.bias.double())),
                                model.lm_head.weight.double(), None if not bias else model.lm_head.bias.double())
            want = want[:, -1:]
            for t in tails:
                want = TAILS[t](want).double()
            assert ((got[0].double() - want).abs() <= 1e-5 * (1 + want.abs())).all()
    assert_idempotent(new, LastTokenLogits())


@pytest.mark.parametrize("alone", ["softmax over positions", "log_softmax over positions", "divide by the logits' max"])
def test_tails_that_mix_positions_are_left_alone(alone):
    """Each was rewritten before the fix, and the output changed (1.0 everywhere; the last row's max)."""
    model = Head(8, 16, True, [], alone, False, 0).eval()
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (x,))
    new, rec = run_pass(ep, LastTokenLogits())
    assert (rec.changed, rec.stats.matched, dict(rec.stats.skipped)) == (
        False, 0, {"output is not a linear head through per-position ops": 1})
    assert torch.equal(new.module()(x), ep.module()(x))
