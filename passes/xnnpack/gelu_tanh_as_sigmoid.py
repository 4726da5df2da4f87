"""GeluTanhAsSigmoid: ``aten.gelu(x, approximate="tanh")`` as ``x * sigmoid(...)``, for XNNPACK.

ExecuTorch 1.5.1's XNNPACK partitioner delegates every ``aten.gelu`` and serializes it as
XNNPACK's GELU, which is the exact (erf) form: the ``approximate="tanh"`` argument is dropped.
Gemma's ``gelu_pytorch_tanh`` then differs by up to ~1e-3 per activation (measured on the tiny
multimodal model: fp32 logits 1.7e-3 relative off eager before this pass).

The tanh GELU ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3)))``, ``c = sqrt(2 / pi)``, is
``x * sigmoid(2c * (x + 0.044715 * x^3))`` (``(1 + tanh(z)) / 2 = sigmoid(2z)``), written with its
constants folded as ``x * sigmoid(x * (K0 + K1 * x * x))``: 6 XNNPACK operators (square,
multiply, add, multiply, sigmoid, multiply) where the tanh spelling takes 9. A Gemma 3 layer
has two GELUs on the ``balanced`` recipe (the MLP's and its outlier branch's): 6 operators a
layer fewer, each one set up and run on every call of the delegate.

Matches: ``aten.gelu.default`` whose ``approximate`` is "tanh".
Produces: ``x * sigmoid(x * (K0 + K1 * x * x))`` (mul / add / sigmoid, all delegated by XNNPACK).
Leaves alone: the exact form (``approximate="none"``), which XNNPACK computes as such.
Invariant: equal to torch's tanh GELU up to the dtype's rounding (~1e-7 relative in fp32; for
large negative x the sigmoid form keeps the tiny value the tanh form rounds to 0). Idempotent:
no tanh-GELU is left.
"""

from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import arg, call
from fxport.passes.match import is_op

aten = torch.ops.aten

#: ``2 * sqrt(2 / pi)`` and ``2 * sqrt(2 / pi) * 0.044715``: the sigmoid form's constants
K0 = 2.0 * math.sqrt(2.0 / math.pi)
K1 = K0 * 0.044715


class GeluTanhAsSigmoid(Pass):
    """``gelu(x, approximate="tanh")`` as ``x * sigmoid(x * (K0 + K1 * x * x))`` (see the module docstring)."""

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
                slope = call(g, aten.add.Tensor, call(g, aten.mul.Tensor, call(g, aten.mul.Tensor, x, x), K1), K0)
                y = call(g, aten.mul.Tensor, x, call(g, aten.sigmoid.default, call(g, aten.mul.Tensor, x, slope)))
            y.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(y)
            g.erase_node(node)
            stats.rewritten += 1
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["GeluTanhAsSigmoid", "K0", "K1"]
