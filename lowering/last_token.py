"""LastTokenLogits: a prefill program computes logits for its last position only.

Generation needs the logits of the last prompt token; a chunk of L tokens otherwise pays L
full output-head matmuls (hidden x vocab; for Gemma 3 270M, 640 x 262144 = 168M MACs per
token, more than the rest of the model). This pass makes the output head read only the
last position.

Matches: the first user output of the program, reached backwards from the output through
value-preserving single-tensor ops (``_to_copy``, ``tanh``, ``div``/``mul`` by a scalar or
0-d tensor, ``clone``, ``alias``) to an ``aten.linear`` whose input is rank 3 ``(B, L, H)``.
Produces: ``aten.slice(x, 1, -1)`` on that linear's input, so the output is ``(B, 1, V)``.
When the input is a dynamically quantized activation (torchao's per-token
``choose_qparams_affine -> quantize_affine -> dequantize_affine`` chain, as
``Int8DynamicActivationIntxWeightConfig`` exports it), the slice goes *before* the chain, so
the pattern XNNPACK lowers (dq(q(x)) -> linear) stays intact.
Leaves alone: programs whose head is already length 1 (decode; idempotent: a second run sees
L == 1), outputs not produced by a linear through such ops (counted as skipped with reason).
Invariant: the new output equals ``old_output[:, -1:]`` exactly (the head is per-position).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import call

aten = torch.ops.aten

_PASS_THROUGH = {
    aten._to_copy.default,
    aten.tanh.default,
    aten.clone.default,
    aten.alias.default,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten._log_softmax.default,
}


def _is_scalarish(arg) -> bool:
    if not isinstance(arg, Node):
        return True
    val = arg.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _head_linear(node: Node) -> Node | None:
    """Walk back from ``node`` through per-position ops to the output linear, or None."""
    while isinstance(node, Node) and node.op == "call_function":
        if node.target is aten.linear.default:
            return node
        if node.target not in _PASS_THROUGH:
            return None
        tensors = [a for a in node.args[1:] if isinstance(a, Node)]
        if not all(_is_scalarish(a) for a in tensors):
            return None
        node = node.args[0]
    return None


def _target_name(node: Node) -> str:
    return str(getattr(node.target, "__name__", node.target)) if node.op == "call_function" else ""


def _activation_source(linear: Node) -> tuple[Node, list[Node]]:
    """The per-position activation feeding ``linear`` and the nodes that read it.

    Plain linear: ``(input, [linear])``. Per-token dynamically quantized activation
    ``dequantize_affine(quantize_affine(x, block, scale, zp), ...)`` with ``scale``/``zp`` from
    ``choose_qparams_affine(x, ...)``: ``(x, [quantize, choose_qparams])``.
    """
    a = linear.args[0]
    if not (isinstance(a, Node) and _target_name(a).startswith("dequantize_affine")):
        return a, [linear]
    q = a.args[0]
    if not (isinstance(q, Node) and _target_name(q).startswith("quantize_affine")):
        return a, [linear]
    x = q.args[0]
    consumers = [q]
    for arg in q.args[2:4]:  # scale, zero_point: getitem(choose_qparams(x, ...), i)
        src = arg.args[0] if isinstance(arg, Node) and arg.target is operator.getitem else arg
        if isinstance(src, Node) and _target_name(src).startswith("choose_qparams_affine") and src.args[0] is x:
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
        out_node = ep.graph.output_node()
        logits = out_node.args[0][user_outputs[0]]
        linear = _head_linear(logits)
        if linear is None:
            stats.skip("output is not a linear head through per-position ops")
            return PassResult(ep, False, stats)
        stats.matched += 1
        x, consumers = _activation_source(linear)
        val = x.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 3:
            stats.skip("head input is not rank 3 (B, L, H)")
            return PassResult(ep, False, stats)
        if isinstance(val.shape[1], int) and val.shape[1] == 1:
            stats.skip("head input already has length 1")
            return PassResult(ep, False, stats)
        with ep.graph.inserting_after(x):
            last = call(ep.graph, aten.slice.Tensor, x, 1, -1, 9223372036854775807)  # (B, 1, H)
        for consumer in consumers:
            consumer.replace_input_with(x, last)
        stats.rewritten += 1
        stats.sites.append({"node": linear.name, "choice": "last position"})
        return PassResult(ep, True, stats)
