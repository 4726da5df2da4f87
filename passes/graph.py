"""Signature-aware edits of an ExportedProgram.

Passes edit ``ep.graph`` directly; whatever touches inputs (parameters, buffers, constants)
goes through these helpers so the graph signature, ``state_dict`` and ``constants`` never go
stale. After a pass, :func:`update` makes the program consistent again:

  * :func:`refresh` (the fast path, for programs in functional ATen IR) removes dead code,
    re-propagates every node's ``meta["val"]`` with ``FakeTensorProp`` in the program's own
    fake mode / ShapeEnv (symbolic dims stay symbolic, range constraints stay), renames the
    signature's specs to the graph's placeholders and output values, and validates;
  * :func:`retrace` (the fallback) re-runs export's functional tracing
    (``run_decompositions({})``) over the edited graph, which also functionalizes in-place
    ops and rebuilds the signature; it is ~100x slower on large graphs.

Either way a pass only has to keep the *inputs* consistent.

It is also the one vocabulary passes read nodes with (nothing here edits the graph):

  * :func:`val` / :func:`shape` (what a node computes, from ``meta["val"]``), :func:`meta_val`
    (the raw value, e.g. a SymInt), :func:`dims_equal` / :func:`shapes_equal` (symbolic dims
    compared by expression, without guards), :func:`plain_shape` (a shape for messages);
  * :func:`arg` (an argument by position or keyword), :func:`target_name` / :func:`op_name`;
  * :data:`PROVENANCE` / :func:`module_path` / :func:`copy_meta` (where a node came from);
  * :func:`bounds` / :func:`upper_bound` (the range a symbolic size takes in the program).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    InputKind,
    InputSpec,
    OutputKind,
    SymBoolArgument,
    SymFloatArgument,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

aten = torch.ops.aten
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- programs


def clone_program(ep: ExportedProgram) -> ExportedProgram:
    """A copy whose graph and signature can be edited without touching ``ep``.

    Tensors (weights, buffers) are shared, not copied: passes replace entries, never write
    into them. The copied graph may rename nodes whose names shadow a Python builtin (a user
    input named ``input`` becomes ``input_1``), so the copied signature is renamed to match.
    """
    # Graph.graph_copy copies nodes (meta shallow-copied, args remapped) without the
    # GraphModule deepcopy's extra code generation: the program's constructor compiles once.
    graph = torch.fx.Graph()
    value_map: dict[Node, Node] = {}
    graph.output(graph.graph_copy(ep.graph, value_map), type_expr=_output_node(ep.graph).type)
    signature = copy.deepcopy(ep.graph_signature)
    renamed = {old.name: new.name for old, new in value_map.items() if old.name != new.name}
    if renamed:
        for spec in (*signature.input_specs, *signature.output_specs):
            if _has_name(spec.arg) and spec.arg.name in renamed:
                spec.arg = dataclasses.replace(spec.arg, name=renamed[spec.arg.name])
    output = _output_node(graph)
    output.meta = copy.copy(_output_node(ep.graph).meta)
    return ExportedProgram(
        root=ep.graph_module,
        graph=graph,
        graph_signature=signature,
        state_dict=dict(ep.state_dict),
        range_constraints=copy.deepcopy(ep.range_constraints),
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs,
        constants=dict(ep.constants),
        verifiers=ep.verifiers,
    )


def _output_node(graph: torch.fx.Graph) -> Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


class RefreshError(ValueError):
    """:func:`refresh` cannot update this program without a full re-trace (:func:`retrace`)."""


def retrace(ep: ExportedProgram) -> ExportedProgram:
    """Re-trace an edited program into fresh functional ATen IR (metadata, signature).

    Slow on large graphs (~15 s per call on the 31b preset); prefer :func:`update`.
    """
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    return ep.run_decompositions({})


def _has_name(arg) -> bool:
    return isinstance(
        arg, (TensorArgument, SymIntArgument, SymFloatArgument, SymBoolArgument, ConstantArgument)
    ) or (dataclasses.is_dataclass(arg) and hasattr(arg, "name"))


def _fake_mode_of(ep: ExportedProgram) -> FakeTensorMode:
    modes = {
        id(n.meta["val"].fake_mode): n.meta["val"].fake_mode
        for n in ep.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), FakeTensor)
    }
    if len(modes) != 1:
        raise RefreshError(f"placeholders carry {len(modes)} fake modes, expected exactly one")
    return next(iter(modes.values()))


def _mutating_node(graph: torch.fx.Graph) -> Node | None:
    for n in graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            return n
    return None


def _sync_signature(ep: ExportedProgram) -> None:
    """Rename input specs to the placeholders (in order) and output specs to the output values."""
    signature = ep.graph_signature
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(signature.input_specs):
        raise RefreshError(
            f"the graph has {len(nodes)} placeholders but the signature {len(signature.input_specs)} "
            "input specs; add inputs with fxport.passes.graph.add_constant/add_buffer"
        )
    for spec, node in zip(signature.input_specs, nodes):
        if _has_name(spec.arg) and spec.arg.name != node.name:
            spec.arg = dataclasses.replace(spec.arg, name=node.name)
    output = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    values = list(output.args[0])
    if len(values) != len(signature.output_specs):
        raise RefreshError(
            f"the output node returns {len(values)} values but the signature has "
            f"{len(signature.output_specs)} output specs; write buffers back with "
            "fxport.passes.graph.mark_mutated"
        )
    for spec, value in zip(signature.output_specs, values):
        if isinstance(value, Node):
            if isinstance(spec.arg, ConstantArgument) or not _has_name(spec.arg):
                raise RefreshError(f"output {spec.arg} became node {value.name}")
            if spec.arg.name != value.name:
                spec.arg = dataclasses.replace(spec.arg, name=value.name)
        elif not isinstance(spec.arg, ConstantArgument):
            raise RefreshError(f"output {spec.arg.name} became the constant {value!r}")


class GraphSnapshot:
    """What every node of a graph computes, taken before a pass edits it (see :func:`snapshot`).

    :func:`refresh` re-propagates only the nodes that are new, whose target/args/kwargs
    changed, or whose inputs' metadata changed since the snapshot; the others keep their
    ``meta["val"]``.
    """

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.nodes: dict[Node, tuple] = {
            n: (n.target, _rebuild(n.args), _rebuild(n.kwargs), n.meta.get("val")) for n in graph.nodes
        }

    def changed(self, node: Node) -> bool:
        old = self.nodes.get(node)
        if old is None:
            return True
        target, args, kwargs, val = old
        if node.op == "placeholder":
            return node.meta.get("val") is not val
        return node.target is not target or not _same(node.args, args) or not _same(node.kwargs, kwargs)


def snapshot(ep: ExportedProgram) -> GraphSnapshot:
    """Remember ``ep.graph`` before an edit so :func:`refresh` re-propagates only what changed."""
    return GraphSnapshot(ep.graph)


def _rebuild(a):
    """A structural copy of node args (containers copied, leaves shared) to compare later."""
    return torch.fx.node.map_aggregate(a, lambda x: x)


def _same(a, b) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b) or (a != a and b != b)  # nan == nan here
    except Exception:
        return a is b


def _meta_key(val):
    """What downstream shape propagation depends on: shapes/strides (as symbolic exprs), dtype."""
    def dim(x):
        return x.node.expr if isinstance(x, torch.SymInt) else x

    def one(v):
        if isinstance(v, torch.Tensor):
            return (
                "T",
                tuple(dim(x) for x in v.shape),
                tuple(dim(x) for x in v.stride()),
                dim(v.storage_offset()),
                v.dtype,
                v.device,
                v.requires_grad,
            )
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("S", v.node.expr)
        if isinstance(v, (list, tuple)):
            return tuple(one(x) for x in v)
        return ("V", type(v), v if isinstance(v, (int, float, bool, str, type(None))) else id(v))

    return one(val)


class _IncrementalFakeTensorProp(FakeTensorProp):
    """FakeTensorProp that keeps ``meta["val"]`` of nodes unchanged since a snapshot."""

    def __init__(self, module: torch.fx.GraphModule, mode: FakeTensorMode, since: GraphSnapshot | None):
        super().__init__(module, mode)
        self.since = since
        self.dirty: set[Node] = set()  # nodes whose val metadata changed
        self.recomputed = 0

    def run_node(self, n: Node):
        if n.op in ("placeholder", "output"):
            if self.since is None or self.since.changed(n):  # before run_node replaces the val
                self.dirty.add(n)
            return super().run_node(n)
        if (
            self.since is not None
            and "val" in n.meta
            and not self.since.changed(n)
            and not any(a in self.dirty for a in n.all_input_nodes)
        ):
            return n.meta["val"]
        old = n.meta.get("val")
        result = super().run_node(n)
        self.recomputed += 1
        if self.since is None or old is None or _meta_key(old) != _meta_key(n.meta.get("val")):
            self.dirty.add(n)
        return result


def refresh(ep: ExportedProgram, since: GraphSnapshot | None = None) -> ExportedProgram:
    """Fast metadata refresh of an edited program in functional ATen IR.

    Removes dead code (impure ops such as asserts stay), re-propagates ``meta["val"]`` with
    ``FakeTensorProp`` in the fake mode / ShapeEnv of the placeholders (so symbolic dims stay
    the same symbols and ``range_constraints`` still hold), renames the signature's
    input/output specs to the graph's placeholders and output values, and returns a new,
    validated ExportedProgram sharing ``ep``'s graph.

    since: a :func:`snapshot` of the graph taken before the edit; only nodes that are new,
        edited, or downstream of a node whose shape/stride/dtype changed are re-propagated
        (the rest keep their value). None re-propagates every node.

    Raises:
        RefreshError: the program is not functional ATen IR (``ep.dialect`` or an in-place
            op), its placeholders lack a common fake mode, or the graph and the signature
            disagree in count; use :func:`retrace`.
        Exception: whatever fake propagation or validation raises for an invalid graph.
    """
    if ep.dialect != "ATEN":
        raise RefreshError(f"dialect {ep.dialect!r} is not functional ATen IR")
    gm = ep.graph_module
    graph = gm.graph
    if since is not None and since.graph is not graph:
        raise ValueError("refresh: the snapshot was taken of another graph")
    mutating = _mutating_node(graph)
    if mutating is not None:
        raise RefreshError(
            f"node {mutating.name} ({mutating.target}) mutates its input; in-place ops need a full "
            "re-trace (fxport.passes.graph.retrace, or needs_retrace = True on the pass)"
        )
    graph.eliminate_dead_code()
    graph.lint()
    mode = _fake_mode_of(ep)
    args = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
            val = n.meta["val"] = mode.from_tensor(val, static_shapes=True)
        args.append(val)
    _IncrementalFakeTensorProp(gm, mode, since).propagate_dont_convert_inputs(*args)
    _sync_signature(ep)
    return ep._update(gm, ep.graph_signature, state_dict=ep.state_dict, constants=ep.constants)


def update(
    ep: ExportedProgram, *, full: bool = False, since: GraphSnapshot | None = None
) -> tuple[ExportedProgram, str]:
    """Make an edited program consistent again: :func:`refresh`, else :func:`retrace`.

    Returns the new program and how it was updated: ``"refresh"`` (fast path) or
    ``"retrace"`` (``full=True``, or the fast path raised). ``since``: see :func:`refresh`.
    """
    if not full:
        try:
            return refresh(ep, since), "refresh"
        except Exception as e:  # the full re-trace below re-derives everything from the placeholders
            _log.debug("fast refresh failed, re-tracing: %s: %s", type(e).__name__, e)
    return retrace(ep), "retrace"


def to_functional(ep: ExportedProgram) -> ExportedProgram:
    """Normalize torch.export's training IR (in-place ``index_copy_``) to functional IR.

    Idempotent: a program already functional comes back with the same graph.
    """
    return ep.run_decompositions({})


# ----------------------------------------------------------------------------- reading nodes

#: ``node.meta`` keys that say where a node comes from: export's module stack and source line
PROVENANCE = ("nn_module_stack", "stack_trace")


def meta_val(node: Any) -> Any:
    """What a node produces as export recorded it (``meta["val"]``: a fake tensor, a SymInt,
    a tuple ...), or None (also for non-nodes)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def val(node: Any) -> torch.Tensor | None:
    """The fake tensor a node produces (``meta["val"]``), or None."""
    v = meta_val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> tuple | None:
    """The shape of the tensor a node produces (ints and SymInts), or None."""
    v = val(node)
    return None if v is None else tuple(v.shape)


def dims_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints and SymInts, without guarding (symbolic dims compare by expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    return bool(ea == eb) if isinstance(ea, int) and isinstance(eb, int) else str(ea) == str(eb)


def shapes_equal(a: tuple | None, b: tuple | None) -> bool:
    """Both shapes known, of one rank, and :func:`dims_equal` dim by dim."""
    return a is not None and b is not None and len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def plain_shape(s: tuple | None) -> tuple | None:
    """A shape for messages and stats: ints stay ints, symbolic dims become their name (``'s27'``)."""
    return None if s is None else tuple(d if isinstance(d, int) else str(d) for d in s)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, passed at position ``index`` or by keyword, else ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def target_name(node: Node) -> str:
    """The op a node calls, in full (``aten.index_copy.default``), or its kind (``placeholder``)."""
    return str(node.target) if node.op == "call_function" else node.op


def op_name(node: Node) -> str:
    """The op's own name without its namespace (``dequantize_affine.default``); "" for non-calls."""
    return str(getattr(node.target, "__name__", node.target)) if node.op == "call_function" else ""


def module_path(node: Node) -> str | None:
    """Innermost module FQN that called ``node`` (from export's ``nn_module_stack``), if known."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] or None


def copy_meta(src: Node, dst: Node, keys: tuple[str, ...] = (*PROVENANCE, "val")) -> None:
    """Give ``dst`` the entries of ``src.meta`` under ``keys`` that ``src`` has (a rewrite's new
    node keeps the module stack and source line of the node it replaces, for dumps)."""
    dst.meta.update({k: v for k, v in src.meta.items() if k in keys})


# ----------------------------------------------------------------------------- symbol bounds


def bounds(ep: ExportedProgram, size: Any) -> tuple[int | float, int | float]:
    """``(lowest, largest)`` value ``size`` takes in ``ep``: an int as is; a SymInt / sympy
    expression / node producing a SymInt bounded by its symbols' ranges
    (``ep.range_constraints``, then the program's shape env for symbols not listed there, e.g.
    unbacked ones); ``-inf`` / ``inf`` where unbounded."""
    if isinstance(size, Node):
        size = size.meta.get("val")
    if isinstance(size, bool):
        raise TypeError(f"bounds: expected a size, got {size!r}")
    if isinstance(size, int):
        return size, size
    import sympy
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    expr = size.node.expr if isinstance(size, torch.SymInt) else size
    if not isinstance(expr, sympy.Expr):
        raise TypeError(f"bounds: expected an int, SymInt or sympy expression, got {type(size).__name__}")
    ranges: dict = {}
    env = _shape_env(ep)
    if env is not None:
        ranges.update(env.var_to_range)
    ranges.update(ep.range_constraints)
    ranges = {s: ranges.get(s, ValueRanges.unknown()) for s in expr.free_symbols}
    r = bound_sympy(expr, ranges)
    return (int(r.lower) if r.lower.is_finite else float("-inf"),
            int(r.upper) if r.upper.is_finite else float("inf"))


def upper_bound(ep: ExportedProgram, size: Any) -> int | float:
    """The largest value ``size`` takes in ``ep`` (:func:`bounds`); ``inf`` if unbounded."""
    return bounds(ep, size)[1]


def _shape_env(ep: ExportedProgram):
    for node in ep.graph.nodes:
        v = node.meta.get("val")
        mode = getattr(v, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
        if isinstance(v, torch.SymInt):
            return v.node.shape_env
    return None


# ----------------------------------------------------------------------------- lookups


def input_spec(ep: ExportedProgram, placeholder: Node) -> InputSpec:
    for spec in ep.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == placeholder.name:
            return spec
    raise KeyError(f"{placeholder.name} is not an input of the program")


def placeholders(ep: ExportedProgram) -> dict[str, Node]:
    return {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}


def buffer_placeholders(ep: ExportedProgram) -> dict[str, Node]:
    """Buffer FQN (e.g. ``model.layers.3.self_attn.k_cache``) -> its placeholder node."""
    nodes = placeholders(ep)
    return {
        spec.target: nodes[spec.arg.name]
        for spec in ep.graph_signature.input_specs
        if spec.kind == InputKind.BUFFER
    }


def tensor_of(ep: ExportedProgram, placeholder: Node) -> torch.Tensor | None:
    """The parameter, buffer or constant tensor behind a placeholder (None for user inputs)."""
    spec = input_spec(ep, placeholder)
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
        if spec.target in ep.state_dict:
            return ep.state_dict[spec.target]
        return ep.constants.get(spec.target)  # non-persistent buffers live in constants
    if spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
        return ep.constants[spec.target]
    return None


def mutated_buffers(ep: ExportedProgram) -> dict[str, str]:
    """Buffer FQN -> name of the graph output node that writes it back."""
    return {
        spec.target: spec.arg.name
        for spec in ep.graph_signature.output_specs
        if spec.kind == OutputKind.BUFFER_MUTATION
    }


# ----------------------------------------------------------------------------- edits


def _fake_like(node: Node, tensor: torch.Tensor) -> None:
    fake_mode = None
    for n in node.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            fake_mode = val.fake_mode
            break
    if fake_mode is None:
        node.meta["val"] = tensor
        return
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)


def _insert_input(
    ep: ExportedProgram, kind: InputKind, target: str, tensor: torch.Tensor, persistent: bool | None
) -> Node:
    """Add a placeholder of ``kind`` at the end of that kind's block of inputs."""
    graph = ep.graph
    specs = ep.graph_signature.input_specs
    order = [InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR]
    rank = order.index(kind)
    # The new input goes before the first spec of a later kind (or before the user inputs).
    index = next(
        (i for i, s in enumerate(specs) if s.kind not in order[: rank + 1]),
        len(specs),
    )
    nodes = placeholders(ep)
    existing = set(nodes)
    base = "c_" if kind == InputKind.CONSTANT_TENSOR else ("b_" if kind == InputKind.BUFFER else "p_")
    name = base + target.replace(".", "_")
    while name in existing:
        name += "_"
    if index < len(specs):
        anchor = nodes[specs[index].arg.name]
        with graph.inserting_before(anchor):
            node = graph.placeholder(name)
    else:
        first_non_placeholder = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_non_placeholder):
            node = graph.placeholder(name)
    node.name = name  # graph.placeholder may uniquify; keep the spec in sync below
    _fake_like(node, tensor)
    specs.insert(index, InputSpec(kind=kind, arg=TensorArgument(name=node.name), target=target, persistent=persistent))
    return node


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, or for meta tensors (no values) equal dtype and both on meta."""
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta and a.dtype == b.dtype
    return torch.equal(a, b)


def add_constant(ep: ExportedProgram, target: str, tensor: torch.Tensor) -> Node:
    """Add a lifted constant tensor (e.g. a packed weight) and return its placeholder.

    If a constant with the same ``target`` already exists and holds an equal tensor, its
    placeholder is returned, so methods that add the same constant stay consistent. Meta
    tensors (a program without weights) have no values: equal shape and dtype count as equal.
    """
    for spec in ep.graph_signature.input_specs:
        if spec.target == target:
            existing = ep.constants.get(target, ep.state_dict.get(target))
            if existing is None or existing.shape != tensor.shape or not _same_values(existing, tensor):
                raise ValueError(f"add_constant: {target!r} already exists with different contents")
            return placeholders(ep)[spec.arg.name]
    ep.constants[target] = tensor
    return _insert_input(ep, InputKind.CONSTANT_TENSOR, target, tensor, None)


def add_buffer(ep: ExportedProgram, target: str, tensor: torch.Tensor, persistent: bool = True) -> Node:
    """Add a (persistent) buffer input; mutate it by returning a value from :func:`mark_mutated`."""
    if target in buffer_placeholders(ep):
        raise ValueError(f"add_buffer: buffer {target!r} already exists")
    if persistent:
        ep.state_dict[target] = tensor
    else:
        ep.constants[target] = tensor
    return _insert_input(ep, InputKind.BUFFER, target, tensor, persistent)


def mark_mutated(ep: ExportedProgram, target: str, new_value: Node) -> None:
    """Write ``new_value`` back to buffer ``target`` at the end of the program."""
    output = next(n for n in ep.graph.nodes if n.op == "output")
    outs = list(output.args[0])
    specs = ep.graph_signature.output_specs
    n_mut = sum(1 for s in specs if s.kind == OutputKind.BUFFER_MUTATION)
    for i, spec in enumerate(specs):
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target == target:
            outs[i] = new_value
            spec.arg = TensorArgument(name=new_value.name)
            output.args = (tuple(outs),)
            return
    outs.insert(n_mut, new_value)
    from torch.export.graph_signature import OutputSpec

    specs.insert(n_mut, OutputSpec(kind=OutputKind.BUFFER_MUTATION, arg=TensorArgument(name=new_value.name), target=target))
    output.args = (tuple(outs),)


def resize_buffer(ep: ExportedProgram, target: str, tensor: torch.Tensor) -> Node:
    """Replace buffer ``target`` by ``tensor`` (new shape allowed); returns its placeholder.

    Downstream shapes are recomputed by :func:`retrace`; the pass is responsible for making
    the ops that read the buffer valid for the new shape.
    """
    node = buffer_placeholders(ep)[target]
    if target in ep.state_dict:
        ep.state_dict[target] = tensor
    else:
        ep.constants[target] = tensor
    _fake_like(node, tensor)
    return node


def remove_unused_inputs(ep: ExportedProgram) -> list[str]:
    """Drop parameter/buffer/constant placeholders nothing reads; returns their targets."""
    removed = []
    specs = ep.graph_signature.input_specs
    nodes = placeholders(ep)
    for spec in list(specs):
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        node = nodes[spec.arg.name]
        if node.users:
            continue
        ep.graph.erase_node(node)
        specs.remove(spec)
        ep.state_dict.pop(spec.target, None)
        ep.constants.pop(spec.target, None)
        removed.append(spec.target)
    return removed


def replace_node(old: Node, new: Node) -> None:
    """Point every user of ``old`` at ``new`` and erase ``old`` (and its dead producers)."""
    old.replace_all_uses_with(new)
    graph = old.graph
    graph.erase_node(old)


def call(graph: torch.fx.Graph, op, *args, **kwargs) -> Node:
    """``graph.call_function`` with positional args, for short rewrite code."""
    return graph.call_function(op, args, kwargs)
