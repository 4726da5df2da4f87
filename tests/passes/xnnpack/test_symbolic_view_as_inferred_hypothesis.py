"""SymbolicViewAsInferred on drawn views of a (B, L, 8) input with B, L or both dynamic, and on
the ``reshape`` SDPAAsMatmul writes for a dynamic-length attention's reader.

Each drawn view has a known number of symbolic sizes for the drawn dynamic dims (export writes
``x.view(B * L, 8)`` as ``[s0*s1, 8]``, ``x.view(-1, 8)`` keeps the ``-1``). Expected from the
contract: views with one symbolic size and no ``-1`` are rewritten to name it ``-1`` (the other
sizes unchanged), views with several symbolic sizes or a ``-1`` are skipped with the reason,
static views are not counted; outputs are equal exactly at several sizes; a second run changes
nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.export import Dim

from fxport.passes import SDPAAsMatmul, SymbolicViewAsInferred
from fxport.passes.graph import to_functional

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, run_pass

aten = torch.ops.aten
SKIP = "several symbolic or inferred dims"


def _views(x, name):
    B, L, F = x.shape
    return {
        "flat": lambda: x.view(B * L, F),
        "split": lambda: x.view(B, L, 2, 4),
        "merge tail": lambda: x.view(B, L * F),
        "-1": lambda: x.view(-1, F),
        "B, -1": lambda: x.view(B, -1),
        "transposed": lambda: x.transpose(0, 1).reshape(L, B * F),  # clone + _unsafe_view
        "front": lambda: x.view(1, B * L, F),
        "all": lambda: x.view(B * L * F),
    }[name]()


def symbolic_sizes(name: str, dyn: set) -> tuple[int, bool]:
    """(symbolic entries, has a -1) of the view ``name`` when the dims in ``dyn`` are dynamic."""
    b, l, any_ = "B" in dyn, "L" in dyn, bool(dyn)
    return {"flat": (any_, False), "split": (b + l, False), "merge tail": (b + l, False), "-1": (0, True),
            "B, -1": (b, True), "transposed": (b + l, False), "front": (any_, False), "all": (any_, False)}[name]


class Views(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.names = names

    def forward(self, x):  # (B, L, 8)
        return tuple(_views(x * (i + 1), n) for i, n in enumerate(self.names))


NAMES = ["flat", "split", "merge tail", "-1", "B, -1", "transposed", "front", "all"]


@examples(6)
@given(dyn=st.sets(st.sampled_from(["B", "L"])), names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4),
       B=st.integers(2, 3), L=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_one_symbolic_size_becomes_inferred(dyn, names, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 8, generator=g)
    dims = {0: Dim("B", min=2, max=4)} if "B" in dyn else {}
    if "L" in dyn:
        dims[1] = Dim("L", min=2, max=8)
    ep = torch.export.export(Views(names), (x,), dynamic_shapes=(dims or None,))
    new, rec = run_pass(ep, SymbolicViewAsInferred())

    sizes = [symbolic_sizes(n, dyn) for n in names]
    done = sum(1 for k, minus in sizes if k == 1 and not minus)
    skipped = sum(1 for k, minus in sizes if k > 1 or (k and minus))
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten) == (done > 0, done + skipped, done)
    assert dict(rec.stats.skipped) == ({SKIP: skipped} if skipped else {})
    before = [n for n in to_functional(ep).graph.nodes if n.target in (aten.view.default, aten._unsafe_view.default)]
    after = [n for n in new.graph.nodes if n.target in (aten.view.default, aten._unsafe_view.default)]
    assert len(before) == len(after)
    for old, now in zip(before, after):  # one symbolic size -> -1, everything else as it was
        want = [d if isinstance(d, int) else "sym" for d in old.args[1]]
        if want.count("sym") == 1 and -1 not in want:
            want[want.index("sym")] = -1
        assert [d if isinstance(d, int) else "sym" for d in now.args[1]] == want

    for b, l in {(B, L), (4 if "B" in dyn else B, 7 if "L" in dyn else L)}:
        y = torch.randn(b, l, 8, generator=g)
        for got, ref in zip(new.module()(y), ep.module()(y)):
            assert got.shape == ref.shape and torch.equal(got, ref)  # the same values in the same order
    assert_idempotent(new, SymbolicViewAsInferred())


class Attention(nn.Module):
    """A prefill attention's output read as (B, L, H * D): after SDPAAsMatmul that reader is an
    ``aten.reshape`` with the one symbolic size L (the pass's reshape branch)."""

    def forward(self, q, k, v):  # q (B, H, L, D), k/v (B, H, S, D)
        B, H, L, D = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)


@examples(3)
@given(B=st.sampled_from([1, 2]), H=st.sampled_from([1, 2]), L=st.integers(2, 5), S=st.integers(1, 6),
       D=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_a_reshape_becomes_a_view_of_a_contiguous_copy(B, H, L, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (L, S, S))
    ep = torch.export.export(Attention(), (q, k, v), dynamic_shapes=({2: Dim("L", min=2, max=8)}, None, None))
    matmul, _ = run_pass(ep, SDPAAsMatmul())
    # one head: SDPAAsMatmul's reshape (its transpose is viewable); more: export's clone + _unsafe_view
    reader = aten.reshape.default if H == 1 else aten._unsafe_view.default
    (before,) = [n for n in matmul.graph.nodes if n.target is reader]
    assert [d if isinstance(d, int) else "sym" for d in before.args[1]] == [B, "sym", H * D]
    new, rec = run_pass(matmul, SymbolicViewAsInferred())
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (True, 1, 1, {})
    assert aten.reshape.default not in {n.target for n in new.graph.nodes}
    (view,) = [n for n in new.graph.nodes if n.op == "call_function" and n.args and n.args[-1] == [B, -1, H * D]]
    assert view.target is (aten.view.default if H == 1 else reader)
    assert view.args[0].target is aten.clone.default  # reshape -> view of a contiguous copy
    for length in (L, 7):
        args = (torch.randn(B, H, length, D, generator=g), k, v)
        got = new.module()(*args)
        assert torch.equal(got, matmul.module()(*args))  # a contiguous copy viewed: the same values
        torch.testing.assert_close(got, ep.module()(*args), rtol=1e-5, atol=1e-6)  # SDPA vs matmul: fp32 order
    assert_idempotent(new, SymbolicViewAsInferred())
