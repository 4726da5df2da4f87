"""GeluTanhAsTanh: ``aten.gelu(x, approximate="tanh")`` as its formula, for XNNPACK.

ExecuTorch 1.5.1's XNNPACK partitioner delegates every ``aten.gelu`` and serializes it as
XNNPACK's GELU, which is the exact (erf) form: the ``approximate="tanh"`` argument is dropped.
Gemma's ``gelu_pytorch_tanh`` then differs by up to ~1e-3 per activation (measured on the tiny
multimodal model: fp32 logits 1.7e-3 relative off eager before this pass).

Matches: ``aten.gelu.default`` whose ``approximate`` is "tanh".
Produces: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x * x * x)))`` (mul / add / tanh,
all delegated by XNNPACK).
Leaves alone: the exact form (``approximate="none"``), which XNNPACK computes as such.
Invariant: equal to torch's tanh GELU up to fp32 rounding (~1e-7 relative). Idempotent: no
tanh-GELU is left.
"""

from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import arg, call
from fxport.passes.match import is_op

aten = torch.ops.aten


class GeluTanhAsTanh(Pass):
    """``gelu(x, approximate="tanh")`` spelled out (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if not is_op(node, aten.gelu.default):
                continue
            approximate = arg(node, 1, "approximate", "none")
            if approximate != "tanh":
                continue  # XNNPACK's GELU is the exact form: nothing to fix
            stats.matched += 1
            x = node.args[0]
            with g.inserting_before(node):
                x3 = call(g, aten.mul.Tensor, call(g, aten.mul.Tensor, x, x), x)
                inner = call(g, aten.add.Tensor, x, call(g, aten.mul.Tensor, x3, 0.044715))
                t = call(g, aten.tanh.default, call(g, aten.mul.Tensor, inner, math.sqrt(2.0 / math.pi)))
                y = call(g, aten.mul.Tensor, call(g, aten.mul.Tensor, x, 0.5), call(g, aten.add.Tensor, t, 1.0))
            y.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(y)
            g.erase_node(node)
            stats.rewritten += 1
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["GeluTanhAsTanh"]
