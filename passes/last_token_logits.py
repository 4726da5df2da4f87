"""LastTokenLogits: a prefill program computes logits for its last position only.

Generation needs the logits of the last prompt token; a chunk of L tokens otherwise pays L
full output-head matmuls (hidden x vocab; for Gemma 3 270M, 640 x 262144 = 168M MACs per
token, more than the rest of the model). This pass makes the output head read only the
last position.

Matches: the first user output of the program, reached backwards from the output through
value-preserving per-position ops (:data:`PER_POSITION`: ``_to_copy``, ``tanh``, ``div``/``mul``
by a number or a 0-d tensor computed from constants only, ``clone``, ``alias``, softmax /
log-softmax over the last dim) to an ``aten.linear`` whose input is rank 3 ``(B, L, H)``.
Produces: ``aten.slice(x, 1, -1)`` on that linear's input, so the output is ``(B, 1, V)``.
When the input is a dynamically quantized activation (torchao's per-token
``choose_qparams_affine -> quantize_affine -> dequantize_affine`` chain, as
``Int8DynamicActivationIntxWeightConfig`` exports it), the slice goes *before* the chain, so
the pattern XNNPACK lowers (dq(q(x)) -> linear) stays intact.
Leaves alone (skip reasons): programs whose head input is already length 1 (decode; so the
pass is idempotent: a second run sees L == 1), outputs not produced by a linear through such
ops, head inputs that are not rank 3, programs without a user output.
Invariant: the new output equals ``old_output[:, -1:]`` (the head is per position) up to the
rounding of the head matmul, which BLAS may block differently for 1 row than for L rows
(~1e-7 relative in fp32).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import arg, call, op_name, val

aten = torch.ops.aten

#: ops between the output head and the program output that act per position
PER_POSITION = frozenset({
    aten._to_copy.default, aten.tanh.default, aten.clone.default, aten.alias.default,
    aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
})


SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default})


def _reads_inputs(node: Node, user_inputs: set[str]) -> bool:
    """Whether ``node`` depends on a user input (so it may vary with the positions)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name in user_inputs:
            return True
        todo.extend(n.all_input_nodes)
    return False


def _is_constant_scalar(x, user_inputs: set[str]) -> bool:
    """A Python number, or a 0-d tensor computed from constants only (a 0-d reduction of the
    logits themselves, ``y / y.max()``, is not per position)."""
    if not isinstance(x, Node):
        return True
    v = val(x)
    return v is not None and v.dim() == 0 and not _reads_inputs(x, user_inputs)


def _per_position(node: Node, user_inputs: set[str]) -> bool:
    if node.target not in PER_POSITION:
        return False
    if node.target in SOFTMAXES:  # only over the vocabulary (last) dim
        v = val(node)
        dim = arg(node, 1, "dim")
        return v is not None and isinstance(dim, int) and dim % v.dim() == v.dim() - 1
    return all(_is_constant_scalar(a, user_inputs) for a in node.args[1:] if isinstance(a, Node))


def _head_linear(node: Node, user_inputs: set[str]) -> Node | None:
    """Walk back from ``node`` through per-position ops to the output linear, or None."""
    while isinstance(node, Node) and node.op == "call_function":
        if node.target is aten.linear.default:
            return node
        if not _per_position(node, user_inputs):
            return None
        node = node.args[0]
    return None


def _activation_source(linear: Node) -> tuple[Node, list[Node]]:
    """The per-position activation feeding ``linear`` and the nodes that read it.

    Plain linear: ``(input, [linear])``. Per-token dynamically quantized activation
    ``dequantize_affine(quantize_affine(x, block, scale, zp), ...)`` with ``scale``/``zp`` from
    ``choose_qparams_affine(x, ...)``: ``(x, [quantize, choose_qparams])``.
    """
    a = linear.args[0]
    if not (isinstance(a, Node) and op_name(a).startswith("dequantize_affine")):
        return a, [linear]
    q = a.args[0]
    if not (isinstance(q, Node) and op_name(q).startswith("quantize_affine")):
        return a, [linear]
    x = q.args[0]
    consumers = [q]
    for qparam in q.args[2:4]:  # scale, zero_point: getitem(choose_qparams(x, ...), i)
        src = qparam.args[0] if isinstance(qparam, Node) and qparam.target is operator.getitem else qparam
        if isinstance(src, Node) and op_name(src).startswith("choose_qparams_affine") and src.args[0] is x:
            if src not in consumers:
                consumers.append(src)
    return x, consumers


class LastTokenLogits(Pass):
    """Slice the output head's input to the last position (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        user_outputs = [
            i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT
        ]
        if not user_outputs:
            stats.skip("no user output")
            return PassResult(ep, False, stats)
        logits = ep.graph.output_node().args[0][user_outputs[0]]
        linear = _head_linear(logits, set(ep.graph_signature.user_inputs))
        if linear is None:
            stats.skip("output is not a linear head through per-position ops")
            return PassResult(ep, False, stats)
        stats.matched += 1
        x, consumers = _activation_source(linear)
        v = val(x)
        if v is None or v.dim() != 3:
            stats.skip("head input is not rank 3 (B, L, H)")
            return PassResult(ep, False, stats)
        if isinstance(v.shape[1], int) and v.shape[1] == 1:
            stats.skip("head input already has length 1")
            return PassResult(ep, False, stats)
        with ep.graph.inserting_after(x):
            last = call(ep.graph, aten.slice.Tensor, x, 1, -1, 9223372036854775807)  # (B, 1, H)
        for consumer in consumers:
            consumer.replace_input_with(x, last)
        stats.rewritten += 1
        stats.sites.append({"node": linear.name, "choice": "last position"})
        return PassResult(ep, True, stats)


__all__ = ["LastTokenLogits", "PER_POSITION"]
