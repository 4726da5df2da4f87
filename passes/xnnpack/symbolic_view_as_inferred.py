"""SymbolicViewAsInferred: a view whose target shape has one symbolic dim names it ``-1``.

XNNPACK's partitioner rejects ``view_copy`` with a symbolic size (``[1, s, 4, 256]`` from
``x.view(B, L, H, D)`` in a dynamic-length prefill) but takes one inferred dim
(``[1, -1, 4, 256]``); each rejected view splits the delegate around it.

Matches: ``aten.view`` / ``aten._unsafe_view`` / ``aten.reshape``
(:data:`fxport.passes.attention.VIEW_OPS`) whose shape list has exactly one non-int entry
and no ``-1``.
Produces: the same node with that entry replaced by ``-1`` (a reshape becomes
``view(clone(x, contiguous), shape)``: a reshape is decomposed later with its sizes
recomputed, which would bring the symbolic dim back).
Leaves alone: views with static shapes (not counted), views with several symbolic dims or a
``-1`` already, or a zero-size dim (skip reasons). The rewritten views have no symbolic size
left, so the pass is idempotent.
Invariant: identical output shape and values (the inferred dim is the one symbolic dim).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from fxport.passes.attention import VIEW_OPS
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import call, remove_unused_inputs
from fxport.passes.match import is_op

aten = torch.ops.aten


class SymbolicViewAsInferred(Pass):
    """A view's one symbolic size becomes ``-1`` (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        for node in ep.graph.nodes:
            if not is_op(node, VIEW_OPS) or len(node.args) < 2:
                continue
            shape = node.args[1]
            if not isinstance(shape, (list, tuple)):
                continue
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if not symbolic:
                continue
            stats.matched += 1
            if len(symbolic) != 1 or any(d == -1 for d in shape if isinstance(d, int)):
                stats.skip("several symbolic or inferred dims")
                continue
            if any(d == 0 for d in shape if isinstance(d, int)):
                stats.skip("a zero-size dim")
                continue
            new_shape = list(shape)
            new_shape[symbolic[0]] = -1
            src = node.args[0]
            if node.target is aten.reshape.default:
                # reshape decomposes to a view of sizes computed again (symbolic); a contiguous
                # copy (removed inside XNNPACK delegates) viewed with -1 keeps the -1
                with ep.graph.inserting_before(node):
                    src = call(ep.graph, aten.clone.default, src, memory_format=torch.contiguous_format)
                node.target = aten.view.default
            node.args = (src, new_shape, *node.args[2:])
            stats.rewritten += 1
        if stats.rewritten:
            ep.graph.eliminate_dead_code()
            remove_unused_inputs(ep)
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["SymbolicViewAsInferred"]
