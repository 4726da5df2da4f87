"""Signature-aware graph helpers (passes/graph.py) and the Pass.__call__ contract."""

import operator

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


# ----------------------------------------------------------------------------- fast refresh


class RingTheCache(Pass):
    """Shrinks k_cache to 8 slots along dim 2 and writes it at ``pos % 8``."""

    def run(self, ep, ctx):
        G.resize_buffer(ep, "k_cache", torch.zeros(1, 2, 8, 4))
        copy_node = next(n for n in ep.graph.nodes if n.target == aten.index_copy.default)
        with ep.graph.inserting_before(copy_node):
            wrapped = G.call(ep.graph, aten.remainder.Scalar, copy_node.args[2], 8)
        copy_node.update_arg(2, wrapped)
        return PassResult(ep, True, PassStats(rewritten=1))


class ReplaceOutputs(Pass):
    """Recreates the cache write and the user output as new nodes (new names), and leaves a
    dead node behind; the signature must follow the output node."""

    def run(self, ep, ctx):
        graph = ep.graph
        copy_node = next(n for n in graph.nodes if n.target == aten.index_copy.default)
        linear = next(n for n in graph.nodes if n.target == aten.linear.default)
        with graph.inserting_after(copy_node):
            new_copy = G.call(graph, aten.index_copy.default, *copy_node.args)
        with graph.inserting_after(linear):
            scaled = G.call(graph, aten.mul.Tensor, linear, 2.0)
        with graph.inserting_after(scaled):
            G.call(graph, aten.neg.default, scaled)  # dead: nothing reads it
        G.replace_node(copy_node, new_copy)
        for user in [u for u in linear.users if u is not scaled]:
            user.replace_input_with(linear, scaled)
        return PassResult(ep, True, PassStats(rewritten=2))


class NeedsRetrace(RingTheCache):
    needs_retrace = True


class InPlaceAdd(Pass):
    """Inserts an in-place op (not functional IR): only a full re-trace can functionalize it."""

    def run(self, ep, ctx):
        out = _output(ep)
        y = out.args[0][-1]
        with ep.graph.inserting_before(out):
            y2 = G.call(ep.graph, aten.add_.Tensor, G.call(ep.graph, aten.clone.default, y), 1.0)
        out.update_arg(0, (*out.args[0][:-1], y2))
        return PassResult(ep, True, PassStats(rewritten=1))


def _reference(module, x, pos, slots):
    """CacheAttention on a cache of ``slots`` positions written at ``pos % slots``."""
    cache = torch.zeros(1, 2, slots, 4).index_copy(2, pos % slots, x)
    attn = F.scaled_dot_product_attention(x, cache, cache)
    return F.linear(attn, module.proj.weight, module.proj.bias), cache


def test_fast_refresh_after_resize_keeps_symbolic_dims():
    ep = _export()
    result = RingTheCache()(ep)
    new = result.ep
    assert result.refresh == "refresh"
    assert new.range_constraints == ep.range_constraints  # L keeps its range [2, 8]
    (sym,) = ep.range_constraints
    written = next(n for n in new.graph.nodes if n.target == aten.index_copy.default)
    assert tuple(written.meta["val"].shape) == (1, 2, 8, 4)
    attn = next(n for n in new.graph.nodes if n.target == aten.scaled_dot_product_attention.default)
    b, h, length, d = attn.meta["val"].shape
    assert (b, h, d) == (1, 2, 4) and isinstance(length, torch.SymInt) and str(length) == str(sym)
    wrapped = next(n for n in new.graph.nodes if n.target == aten.remainder.Scalar)
    assert str(wrapped.meta["val"].shape[0]) == str(sym)
    # Only changed nodes were re-propagated; a full propagation finds the same metadata.
    full = G.refresh(G.clone_program(new))
    keys = [(n.name, G._meta_key(n.meta.get("val"))) for n in new.graph.nodes if n.op != "output"]
    assert keys == [(n.name, G._meta_key(n.meta.get("val"))) for n in full.graph.nodes if n.op != "output"]
    # Numerics: positions 6..10 wrap around the 8 slots.
    x, pos = torch.randn(1, 2, 5, 4), torch.arange(6, 11)
    module = new.module()
    expected, cache = _reference(module, x, pos, 8)
    torch.testing.assert_close(module(x, pos), expected, rtol=0, atol=0)
    torch.testing.assert_close(module.k_cache, cache, rtol=0, atol=0)


def test_replacing_output_nodes_keeps_signature_valid_and_drops_dead_code():
    ep = _export()
    x, pos = torch.randn(1, 2, 3, 4), torch.arange(3)
    expected = ep.module()(x, pos) * 2
    result = ReplaceOutputs()(ep)
    new = result.ep
    assert result.refresh == "refresh"
    out_names = [a.name for a in _output(new).args[0]]
    assert [s.arg.name for s in new.graph_signature.output_specs] == out_names
    assert out_names == ["index_copy_default", "mul_tensor"]  # the new nodes
    assert G.mutated_buffers(new) == {"k_cache": "index_copy_default"}
    targets = [n.target for n in new.graph.nodes if n.op == "call_function"]
    assert aten.neg.default not in targets  # dead code eliminated
    assert targets.count(aten.index_copy.default) == 1
    module = new.module()
    torch.testing.assert_close(module(x, pos), expected, rtol=0, atol=0)
    torch.testing.assert_close(module.k_cache[:, :, :3], x, rtol=0, atol=0)  # still mutated


def test_dead_code_elimination_keeps_runtime_asserts():
    ep = _export()
    graph = ep.graph
    # A runtime assert has no users; dead code elimination must keep it.
    x = next(n for n in graph.nodes if n.name == "x")
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        size = G.call(graph, aten.sym_size.int, x, 2)
        ge = G.call(graph, operator.ge, size, 2)
        G.call(graph, aten._assert_scalar.default, ge, "L >= 2")
    size.meta["val"] = x.meta["val"].shape[2]
    ep = G.refresh(ep)
    asserts = [n for n in ep.graph.nodes if n.target == aten._assert_scalar.default]
    assert len(asserts) == 1 and asserts[0].args[1] == "L >= 2"


def test_needs_retrace_flag_uses_full_retrace():
    ep = _export()
    result = NeedsRetrace()(ep)
    assert result.refresh == "retrace"
    written = next(n for n in result.ep.graph.nodes if n.target == aten.index_copy.default)
    assert tuple(written.meta["val"].shape) == (1, 2, 8, 4)


def test_in_place_op_falls_back_to_retrace():
    ep = _export()
    x, pos = torch.randn(1, 2, 3, 4), torch.arange(3)
    expected = ep.module()(x, pos) + 1
    with pytest.raises(G.RefreshError, match=r"node add__tensor \(aten.add_.Tensor\) mutates its input; in-place ops need a full re-trace"):
        G.refresh(InPlaceAdd().run(G.clone_program(ep), None).ep)
    result = InPlaceAdd()(ep)
    assert result.refresh == "retrace"
    targets = {n.target for n in result.ep.graph.nodes if n.op == "call_function"}
    assert aten.add_.Tensor not in targets and aten.add.Tensor in targets  # functionalized
    torch.testing.assert_close(result.ep.module()(x, pos), expected, rtol=0, atol=0)


def test_clone_program_with_input_named_input():
    # nn.Sequential's forward argument is called ``input``, a Python builtin: the copied graph
    # renames the placeholder to ``input_1`` and the signature must follow.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    ep = torch.export.export(model, (torch.randn(2, 4),)).run_decompositions({})
    assert [s.arg.name for s in ep.graph_signature.input_specs][-1] == "input"
    clone = G.clone_program(ep)
    clone.validate()
    x = torch.randn(2, 4)
    torch.testing.assert_close(clone.module()(x), model(x), rtol=0, atol=0)

    class Double(Pass):
        def run(self, ep, ctx):
            out = _output(ep)
            with ep.graph.inserting_before(out):
                y = G.call(ep.graph, aten.mul.Tensor, out.args[0][0], 2.0)
            out.update_arg(0, (y,))
            return PassResult(ep, True, PassStats(rewritten=1))

    result = Double()(ep)
    assert result.refresh == "refresh"
    torch.testing.assert_close(result.ep.module()(x), model(x) * 2, rtol=0, atol=0)


def test_incremental_refresh_sees_edited_size_args():
    class Flatten(torch.nn.Module):
        def forward(self, x):
            return x.view(2, 6) * 2

    ep = torch.export.export(Flatten(), (torch.randn(3, 4),)).run_decompositions({})

    class Transpose(Pass):
        """Edits the size list of the existing view node in place (no new node)."""

        def run(self, ep, ctx):
            view = next(n for n in ep.graph.nodes if n.target == aten.view.default)
            view.update_arg(1, [4, 3])
            return PassResult(ep, True, PassStats(rewritten=1))

    result = Transpose()(ep)
    assert result.refresh == "refresh"
    mul = next(n for n in result.ep.graph.nodes if n.target == aten.mul.Tensor)
    assert tuple(mul.meta["val"].shape) == (4, 3)  # downstream of the edited node
    x = torch.randn(3, 4)
    torch.testing.assert_close(result.ep.module()(x), x.reshape(4, 3) * 2, rtol=0, atol=0)


def test_node_readers():
    """The vocabulary passes read nodes with: values, shapes compared by expression, arguments by
    position or keyword, op names, where a node came from."""
    ep = _export()
    nodes = {n.name: n for n in ep.graph.nodes}
    x, sdpa = nodes["x"], next(n for n in ep.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    L = G.shape(x)[2]  # the symbolic length
    assert isinstance(L, torch.SymInt) and G.plain_shape(G.shape(x)) == (1, 2, str(L), 4)
    assert G.val(x) is x.meta["val"] and G.val(7) is None and G.meta_val("x") is None
    assert G.shapes_equal(G.shape(sdpa), (1, 2, L, 4)) and not G.shapes_equal(G.shape(sdpa), (1, 2, 3, 4))
    assert G.dims_equal(L, L) and not G.dims_equal(L, 3) and G.dims_equal(3, 3) and not G.shapes_equal(None, ())
    assert G.arg(sdpa, 1, "key") is sdpa.args[1] and G.arg(sdpa, 5, "is_causal", False) is False
    assert G.target_name(sdpa) == "aten.scaled_dot_product_attention.default" and G.target_name(x) == "placeholder"
    assert G.op_name(sdpa) == "scaled_dot_product_attention.default" and G.op_name(x) == ""
    linear = next(n for n in ep.graph.nodes if n.target is aten.linear.default)
    assert G.module_path(linear) == "proj" and G.module_path(x) is None
    with ep.graph.inserting_after(linear):
        twin = G.call(ep.graph, aten.relu.default, linear)
    G.copy_meta(linear, twin)
    assert twin.meta["nn_module_stack"] is linear.meta["nn_module_stack"] and twin.meta["val"] is linear.meta["val"]
    assert G.bounds(ep, L) == (2, 8) and G.upper_bound(ep, x.meta["val"].numel()) == 64  # 1 * 2 * L * 4
