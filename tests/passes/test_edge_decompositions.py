"""EdgeDecompositions: the ops ExecuTorch's edge conversion decomposes, in the form its
``run_decompositions`` gives, without the whole-program re-export.

Checked on a small module with every matched op and a dynamic length (the KV-cache
``index_copy``, ``transpose``, ``masked_fill``, ``zeros_like``, ``arange``, ``&``): the rewritten
graph holds exactly the ops ``run_decompositions(ExecuTorch's table)`` produces, none of the
table's ops is left, values are equal bit for bit at several lengths, and a second run changes
nothing.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.export import Dim

from fxport.passes.edge_decompositions import EdgeDecompositions

S = 8  # cache length


class AllMatched(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, S, 4))

    def forward(self, x, pos):  # x (1, L, 4), pos (L,)
        L = x.shape[1]
        t = x.transpose(1, 2)  # (1, 4, L)
        t2 = x.transpose(-1, 0)  # negative dims
        cache = self.cache.index_copy(2, pos, x.unsqueeze(1).expand(1, 2, L, 4))  # (1, 2, S, 4)
        empty = torch.zeros_like(x, dtype=torch.bool)
        zeros = torch.zeros_like(x)
        a = torch.arange(L)
        causal = (a[:, None] >= a[None, :]) & (pos[:, None] >= 0)  # (L, L) bool
        filled = x.masked_fill(empty, 0.5).masked_fill(x > 0.3, -1.0)
        flat = x.reshape(L * 4)  # contiguous: a view
        heads = t.reshape(4 * L)  # transposed: a copy, then a view
        rows = x.transpose(0, 1).reshape(-1, 4)  # transposed but viewable
        return t * 2, t2 + 1, cache, filled, causal, zeros + 1, a * 3, flat, heads + 1, rows


def _export():
    """Functional ATen IR, with ``reshape`` put back where export decomposed it (fxport's
    SDPAAsMatmul writes ``reshape`` into such graphs)."""
    L = Dim("L", min=1, max=S)
    example = (torch.randn(1, 2, 4), torch.arange(2))
    return _as_reshapes(torch.export.export(AllMatched(), example, dynamic_shapes=({1: L}, {0: L})).run_decompositions({}))


def _as_reshapes(ep):
    """``ep`` with every view written as the ``reshape`` export decomposed into it (the copy export
    made before a view dropped): the form fxport's SDPAAsMatmul writes into a graph."""
    g = ep.graph
    for node in list(g.nodes):
        if node.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
            src = node.args[0]
            if src.target is torch.ops.aten.clone.default:  # the copy export made for a reshape
                node.args = (src.args[0], node.args[1])
                if not src.users:
                    g.erase_node(src)
            node.target = torch.ops.aten.reshape.default
    ep.graph_module.recompile()
    return ep


def _ops(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def programs():
    from executorch.exir.tracer import _default_decomposition_table

    ep = _export()
    table = _default_decomposition_table()
    return ep, EdgeDecompositions()(ep), ep.run_decompositions(table), table


def test_the_graph_is_what_run_decompositions_gives(programs):
    ep, result, reference, table = programs
    before = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert before["aten.reshape.default"] == 3 and before["aten.masked_fill.Scalar"] == 2
    matched = sum(before[op] for op in ("aten.transpose.int", "aten.index_copy.default", "aten.zeros_like.default",
                                        "aten.arange.default", "aten.__and__.Tensor", "aten.masked_fill.Scalar",
                                        "aten.reshape.default"))
    assert result.changed and result.stats.rewritten == result.stats.matched == matched >= 12
    # the two copies: the transposed reshape's, and none for the contiguous or viewable ones
    assert Counter(s["to"] for s in result.stats.sites)["aten.view.default"] == 3
    assert _ops(result.ep) == _ops(reference)
    # what is left of the table: the length's size read, which decomposes into itself
    from fxport.builder.speedups.fewer_retraces import _SIZE_QUERIES

    left = {n.target for n in result.ep.graph.nodes if n.op == "call_function" and n.target in table}
    assert left == {torch.ops.aten.sym_size.int} and left <= _SIZE_QUERIES


@pytest.mark.parametrize("L", [1, 3, S])
def test_values_are_equal_bit_for_bit(programs, L):
    ep, result, _, _ = programs
    x, pos = torch.randn(1, L, 4, generator=torch.Generator().manual_seed(L)), torch.arange(L)
    want, got = ep.module()(x, pos), result.ep.module()(x, pos)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and torch.equal(w, g)


def test_idempotent(programs):
    _, result, _, _ = programs
    again = EdgeDecompositions()(result.ep)
    assert not again.changed and again.stats.matched == 0


# --------------------------------------------------------------------------------- any shape, any dim

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Ops(torch.nn.Module):
    """transpose / index_copy / masked_fill / reshape on a tensor of any rank, along given dims."""

    def __init__(self, d0: int, d1: int, dim: int, shape: list[int]):
        super().__init__()
        self.d0, self.d1, self.dim, self.shape = d0, d1, dim, shape

    def forward(self, x, index, src, mask):
        t = x.transpose(self.d0, self.d1)
        c = x.index_copy(self.dim, index, src)
        f = x.masked_fill(mask, -2.5)
        r = t.reshape(self.shape)
        return t + 0, c, f, r * 1


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    d0, d1 = draw(st.integers(-rank, rank - 1)), draw(st.integers(-rank, rank - 1))
    dim = draw(st.integers(-rank, rank - 1))
    n = sizes[dim]
    index = draw(st.permutations(list(range(n))))[: draw(st.integers(1, n))]
    numel = 1
    for s in sizes:
        numel *= s
    split = draw(st.sampled_from([d for d in range(1, numel + 1) if numel % d == 0]))
    return sizes, d0, d1, dim, index, [split, numel // split], draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None)
@given(cases())
def test_any_rank_and_dims_match_run_decompositions(case):
    from executorch.exir.tracer import _default_decomposition_table

    sizes, d0, d1, dim, index, shape, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes, generator=g)
    idx = torch.tensor(index)
    src_shape = list(sizes)
    src_shape[dim] = len(index)
    args = (x, idx, torch.randn(src_shape, generator=g), torch.rand(sizes, generator=g) > 0.5)
    ep = _as_reshapes(torch.export.export(Ops(d0, d1, dim, shape), args).run_decompositions({}))
    result = EdgeDecompositions()(ep)
    reference = ep.run_decompositions(_default_decomposition_table())
    assert _ops(result.ep) == _ops(reference)
    for want, got in zip(ep.module()(*args), result.ep.module()(*args)):
        assert torch.equal(want, got)
