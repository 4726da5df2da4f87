"""Signature-aware edits of an ExportedProgram.

Passes edit ``ep.graph`` directly; whatever touches inputs (parameters, buffers, constants)
goes through these helpers so the graph signature, ``state_dict`` and ``constants`` never go
stale. After a pass, :func:`retrace` re-runs export's functional tracing over the edited
graph, which recomputes every node's ``meta["val"]`` (shapes, symbolic dims) and rebuilds the
signature from the placeholders, so a pass only has to keep the *inputs* consistent.
"""

from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, TensorArgument
from torch.fx import Node

aten = torch.ops.aten


# ----------------------------------------------------------------------------- programs


def clone_program(ep: ExportedProgram) -> ExportedProgram:
    """A copy whose graph and signature can be edited without touching ``ep``.

    Tensors (weights, buffers) are shared, not copied: passes replace entries, never write
    into them.
    """
    return ep._update(
        copy.deepcopy(ep.graph_module),
        copy.deepcopy(ep.graph_signature),
        state_dict=dict(ep.state_dict),
        constants=dict(ep.constants),
    )


def retrace(ep: ExportedProgram) -> ExportedProgram:
    """Re-trace an edited program into fresh functional ATen IR (metadata, signature)."""
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    return ep.run_decompositions({})


def to_functional(ep: ExportedProgram) -> ExportedProgram:
    """Normalize torch.export's training IR (in-place ``index_copy_``) to functional IR.

    Idempotent: a program already functional comes back with the same graph.
    """
    return ep.run_decompositions({})


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


def user_input_placeholders(ep: ExportedProgram) -> list[Node]:
    nodes = placeholders(ep)
    return [
        nodes[spec.arg.name]
        for spec in ep.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument)
    ]


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


def add_constant(ep: ExportedProgram, target: str, tensor: torch.Tensor) -> Node:
    """Add a lifted constant tensor (e.g. a packed weight) and return its placeholder.

    If a constant with the same ``target`` already exists and holds an equal tensor, its
    placeholder is returned, so methods that add the same constant stay consistent.
    """
    for spec in ep.graph_signature.input_specs:
        if spec.target == target:
            existing = ep.constants.get(target, ep.state_dict.get(target))
            if existing is None or existing.shape != tensor.shape or not torch.equal(existing, tensor):
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


def erase_dead_code(ep: ExportedProgram) -> None:
    """Remove nodes with no users (impure ops such as asserts are kept)."""
    ep.graph.eliminate_dead_code()


def call(graph: torch.fx.Graph, op, *args, **kwargs) -> Node:
    """``graph.call_function`` with positional args, for short rewrite code."""
    return graph.call_function(op, args, kwargs)
