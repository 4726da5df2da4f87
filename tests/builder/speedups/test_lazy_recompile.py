"""lazy_recompile: a GraphModule's code is generated when it is run or read, and is then the code
an eager recompile after the last edit gives; nothing stale outlives the context."""

from __future__ import annotations

import operator
import pickle

import torch
from torch.fx import GraphModule, Tracer, symbolic_trace

from fxport.builder.speedups.lazy_recompile import is_stale, lazy_recompile


class _AddMul(torch.nn.Module):
    def forward(self, x, y):
        return (x + y) * 2


def _swap_add_for_sub(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.add:
            node.target = operator.sub


def _eager_code(gm: GraphModule) -> str:
    return gm.graph.python_code(root_module="self").src


def test_recompile_is_deferred_until_the_module_runs():
    x, y = torch.randn(3), torch.randn(3)
    gm = symbolic_trace(_AddMul())
    with lazy_recompile() as lazy:
        _swap_add_for_sub(gm)
        gm.recompile()
        assert is_stale(gm) and lazy.deferred == 1
        assert torch.equal(gm(x, y), (x - y) * 2)  # the edited graph runs
        assert not is_stale(gm)
        assert torch.equal(gm(x, y), (x - y) * 2)  # and keeps running without another compile
    assert lazy.deferred == 1


def test_code_str_and_pickle_see_the_last_edit():
    gm = symbolic_trace(_AddMul())
    with lazy_recompile():
        _swap_add_for_sub(gm)
        gm.recompile()
        assert "x - y" in gm.code and "x + y" not in gm.code
        assert gm.code == _eager_code(gm)
        _swap_add_for_sub(gm)  # idempotent edit, then a second recompile: stale again
        gm.recompile()
        assert is_stale(gm)
        assert "x - y" in str(gm)
        gm.recompile()
        clone = pickle.loads(pickle.dumps(gm))  # __reduce__ needs recompile()'s PythonCode
        x, y = torch.randn(4), torch.randn(4)
        assert torch.equal(clone(x, y), (x - y) * 2)


def test_nothing_stale_outlives_the_context():
    gm = symbolic_trace(_AddMul())
    with lazy_recompile() as lazy:
        _swap_add_for_sub(gm)
        gm.recompile()
        built = GraphModule(gm, gm.graph)  # the constructor recompiles: deferred too
        assert is_stale(built)
    assert not is_stale(gm) and not is_stale(built)
    assert lazy.compiled >= 2
    assert gm.code == _eager_code(gm)
    assert not is_stale(GraphModule(gm, gm.graph))  # outside the context: eager again


def test_children_are_deferred_with_their_parent():
    inner = symbolic_trace(_AddMul())

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(x, y) + 1

    class KeepsGraphModules(Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, GraphModule) or super().is_leaf_module(m, qualname)

    root = Outer()
    outer = GraphModule(root, KeepsGraphModules().trace(root))
    child = outer.inner
    assert [n.op for n in outer.graph.nodes].count("call_module") == 1
    with lazy_recompile():
        _swap_add_for_sub(child)
        outer.recompile()
        assert is_stale(child)
        x, y = torch.randn(2), torch.randn(2)
        assert torch.equal(outer(x, y), (x - y) * 2 + 1)
