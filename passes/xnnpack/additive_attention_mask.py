"""AdditiveAttentionMask: bool SDPA masks become one shared additive float mask each.

ExecuTorch decomposes a bool-mask SDPA into per-call ``where``/``any``/``logical_not`` ops (to
zero rows with no visible key), none of which XNNPACK takes.

Matches: ``aten.scaled_dot_product_attention`` with a bool ``attn_mask`` (positional or
keyword, read by :func:`fxport.passes.attention.sdpa_args`) and a floating-point query.
Produces: one float mask ``masked_fill(zeros_like(mask, q.dtype), ~mask, -inf)`` per distinct
bool mask node (inserted before its first SDPA, shared by every layer reading it), passed to
SDPA instead.
Leaves alone (skip reasons): float masks and no mask ("no bool mask"; so the pass is
idempotent), queries of unknown or integer dtype.
Invariant: identical output for every query row that sees at least one key (true for causal
/ sliding / ring masks, where each query sees itself); a row that sees no key gives NaN
instead of 0.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.attention import is_sdpa, sdpa_args, set_sdpa_arg
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import call, val

aten = torch.ops.aten


class AdditiveAttentionMask(Pass):
    """Bool SDPA masks become one shared additive float mask each (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        converted: dict[Node, Node] = {}
        for node in list(ep.graph.nodes):
            if not is_sdpa(node):
                continue
            stats.matched += 1
            a = sdpa_args(node)
            mval, qval = val(a.attn_mask), val(a.query)
            if mval is None or mval.dtype != torch.bool:
                stats.skip("no bool mask")
                continue
            if qval is None or not qval.dtype.is_floating_point:
                stats.skip("query dtype unknown")
                continue
            mask = a.attn_mask
            if mask not in converted:  # before its first SDPA; later readers come after it
                with ep.graph.inserting_before(node):
                    zeros = call(ep.graph, aten.zeros_like.default, mask, dtype=qval.dtype)
                    hidden = call(ep.graph, aten.logical_not.default, mask)
                    converted[mask] = call(ep.graph, aten.masked_fill.Scalar, zeros, hidden, float("-inf"))
            set_sdpa_arg(node, "attn_mask", converted[mask])
            stats.rewritten += 1
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["AdditiveAttentionMask"]
