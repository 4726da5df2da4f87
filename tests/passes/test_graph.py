"""Signature-aware graph helpers (passes/graph.py) and the Pass.__call__ contract."""

import pytest
import torch
import torch.nn.functional as F

from fxport.passes import graph as G
from fxport.passes.base import Pass, PassResult, PassStats

aten = torch.ops.aten


class CacheAttention(torch.nn.Module):
    """A cache buffer written with index_copy_ and read by SDPA, plus a linear."""

    def __init__(self, seq: int = 16):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 2, seq, 4))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, pos):  # x (1, 2, L, 4), pos (L,)
        self.k_cache.index_copy_(2, pos, x)
        return self.proj(F.scaled_dot_product_attention(x, self.k_cache, self.k_cache))


def _export():
    L = torch.export.Dim("L", min=2, max=8)
    ep = torch.export.export(
        CacheAttention(), (torch.randn(1, 2, 3, 4), torch.arange(3)), dynamic_shapes=({2: L}, {0: L})
    )
    return G.to_functional(ep)


def _output(ep):
    return next(n for n in ep.graph.nodes if n.op == "output")


class AddConstantAndCounter(Pass):
    """Adds 1 (a new constant) to the user output and counts calls in a new buffer."""

    def run(self, ep, ctx):
        one = G.add_constant(ep, "extra.one", torch.ones(4))
        counter = G.add_buffer(ep, "extra.calls", torch.zeros(1))
        out = _output(ep)
        y = out.args[0][-1]
        with ep.graph.inserting_before(out):
            y1 = G.call(ep.graph, aten.add.Tensor, y, one)
            calls = G.call(ep.graph, aten.add.Tensor, counter, 1.0)
        out.args = (tuple(out.args[0][:-1]) + (y1,),)
        G.mark_mutated(ep, "extra.calls", calls)
        return PassResult(ep, True, PassStats(matched=1, rewritten=1))


class NoOp(Pass):
    def run(self, ep, ctx):
        return PassResult(ep, False, PassStats())


def test_functional_ir_has_buffer_mutation():
    ep = _export()
    assert G.mutated_buffers(ep) == {"k_cache": "index_copy"}
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert aten.index_copy.default in ops and aten.index_copy_.default not in ops


def test_add_constant_and_buffer_keep_signature_valid():
    ep = _export()
    x, pos = torch.randn(1, 2, 3, 4), torch.arange(3)
    expected = ep.module()(x, pos) + 1

    result = AddConstantAndCounter()(ep)
    new = result.ep
    new.validate()
    assert result.changed
    assert new.constants["extra.one"].tolist() == [1.0] * 4
    assert set(G.mutated_buffers(new)) == {"k_cache", "extra.calls"}
    module = new.module()
    torch.testing.assert_close(module(x, pos), expected, rtol=0, atol=0)
    module(x, pos)
    assert module.extra.calls.item() == 2.0  # the new buffer is really mutated per call


def test_pass_does_not_mutate_its_input():
    ep = _export()
    before = str(ep.graph)
    AddConstantAndCounter()(ep)
    assert str(ep.graph) == before
    assert "extra.one" not in ep.constants


def test_unchanged_pass_returns_the_same_program():
    ep = _export()
    result = NoOp()(ep)
    assert result.ep is ep and not result.changed


def test_resize_buffer_and_retrace_refresh_shapes():
    ep = G.clone_program(_export())
    G.resize_buffer(ep, "k_cache", torch.zeros(1, 2, 8, 4))
    copy_node = next(n for n in ep.graph.nodes if n.target == aten.index_copy.default)
    with ep.graph.inserting_before(copy_node):
        wrapped = G.call(ep.graph, aten.remainder.Scalar, copy_node.args[2], 8)
    copy_node.args = (copy_node.args[0], 2, wrapped, copy_node.args[3])
    new = G.retrace(ep)
    new.validate()
    assert tuple(new.state_dict["k_cache"].shape) == (1, 2, 8, 4)
    written = next(n for n in new.graph.nodes if n.target == aten.index_copy.default)
    assert tuple(written.meta["val"].shape) == (1, 2, 8, 4)


def test_remove_unused_inputs_drops_dead_constant():
    ep = G.clone_program(_export())
    G.add_constant(ep, "dead.weight", torch.zeros(3))
    assert G.remove_unused_inputs(ep) == ["dead.weight"]
    assert "dead.weight" not in ep.constants
    G.retrace(ep).validate()


def test_add_constant_twice_with_other_contents_is_an_error():
    ep = G.clone_program(_export())
    G.add_constant(ep, "w", torch.zeros(2))
    assert G.add_constant(ep, "w", torch.zeros(2)).op == "placeholder"  # same contents: reused
    with pytest.raises(ValueError, match="'w' already exists with different contents"):
        G.add_constant(ep, "w", torch.ones(2))
