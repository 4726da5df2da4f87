"""RotateHalfAsLinear on drawn rotate_half sites: rank, leading sizes (one of them dynamic or
not), head dim, the spelling (fxport's model ``rotate_half`` / ``apply_rope``, an explicit slice
end, the positive dim) and cats it must not take (no ``neg``, halves of two tensors, odd D,
bfloat16).

Expected from the contract: matched / rewritten / skipped counts per spelling, one
``fxport_rotate_half.<node>`` (D, D) constant equal to :func:`rotation` per rewritten site,
values equal to the unrewritten program exactly (each output is one input times +-1 plus zeros)
at several lengths, and a second run that changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.export import Dim

from fxport.models.gemma4.model import apply_rope, rotate_half
from fxport.passes import RotateHalfAsLinear
from fxport.passes.xnnpack.rotate_half_as_linear import rotation

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, ops, run_pass

aten = torch.ops.aten
ODD = "not fp32 or last dim odd / dynamic"
#: spelling -> what the pass does with it: "rewrite", a skip reason, or "ignore" (not counted)
SPELLINGS = {"model": "rewrite", "rope": "rewrite", "explicit end": "rewrite", "positive dim": "rewrite",
             "odd D": ODD, "bf16": ODD, "no neg": "ignore", "two tensors": "ignore"}


class Rotations(nn.Module):
    def __init__(self, spellings):
        super().__init__()
        self.spellings = spellings

    def forward(self, x, y, odd):  # x, y (..., D); odd (..., D + 1)
        outs = []
        h, last = x.shape[-1] // 2, x.dim() - 1
        for s in self.spellings:
            if s == "model":
                outs.append(rotate_half(x))
            elif s == "rope":  # cos / sin as the model's RoPE takes them: (L, D) broadcast
                outs.append(apply_rope(x, y.cos(), y.sin()))
            elif s == "explicit end":
                outs.append(torch.cat((-x[..., h:x.shape[-1]], x[..., 0:h]), dim=-1))
            elif s == "positive dim":
                outs.append(torch.cat((-x.narrow(last, h, h), x.narrow(last, 0, h)), dim=last))
            elif s == "odd D":
                outs.append(rotate_half(odd))
            elif s == "bf16":
                outs.append(rotate_half(x.bfloat16()).float())
            elif s == "no neg":
                outs.append(torch.cat((x[..., h:], x[..., :h]), dim=-1))
            elif s == "two tensors":
                outs.append(torch.cat((-x[..., h:], y[..., :h]), dim=-1))
        return tuple(outs)


@examples(10)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), D=st.sampled_from([2, 4, 6, 8, 16]),
       dynamic=st.booleans(), spellings=st.lists(st.sampled_from(sorted(SPELLINGS)), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_rotate_half_becomes_a_signed_permutation(lead, D, dynamic, spellings, seed):
    g = torch.Generator().manual_seed(seed)

    def inputs(n):  # the dynamic dim (the second to last) at size n
        shape = [*lead[:-1], n]
        return (torch.randn(*shape, D, generator=g), torch.randn(*shape, D, generator=g),
                torch.randn(*shape, D + 1, generator=g))

    n = max(lead[-1], 2) if dynamic else lead[-1]
    args = inputs(n)
    shapes = None
    if dynamic:
        Ld = Dim("L", min=2, max=6)
        rank = len(lead) + 1
        shapes = ({rank - 2: Ld}, {rank - 2: Ld}, {rank - 2: Ld})
    ep = torch.export.export(Rotations(spellings), args, dynamic_shapes=shapes)
    new, rec = run_pass(ep, RotateHalfAsLinear())

    fate = [SPELLINGS[s] for s in spellings]
    done = fate.count("rewrite")
    skipped = [f for f in fate if f not in ("rewrite", "ignore")]
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten) == (done > 0, done + len(skipped), done)
    assert dict(rec.stats.skipped) == ({ODD: len(skipped)} if skipped else {})
    weights = {k: v for k, v in new.constants.items() if k.startswith("fxport_rotate_half.")}
    assert len(weights) == done and all(torch.equal(w, rotation(D)) for w in weights.values())
    counts = ops(new)
    assert counts[aten.linear.default] == done and counts[aten.cat.default] == len(spellings) - done

    for size in ([n, 5] if dynamic else [n]):
        args = inputs(size)
        for got, want in zip(new.module()(*args), ep.module()(*args)):
            assert torch.equal(got, want)  # +-1 times one input plus zeros: exact
    x = args[0]
    h = D // 2
    assert torch.equal(torch.nn.functional.linear(x, rotation(D)), torch.cat((-x[..., h:], x[..., :h]), -1))
    assert_idempotent(new, RotateHalfAsLinear())
