"""RotateHalfAsLinear: RoPE's ``rotate_half`` as a linear with a constant signed permutation.

XNNPACK does not take ``slice_copy`` on a tensor with a dynamic dim, so in a dynamic-length
prefill every ``rotate_half`` (``cat([-x[..., h:], x[..., :h]], -1)``, two per layer) splits
the delegate around it.

Matches (:data:`ROTATE_HALF`, a :mod:`fxport.passes.match` pattern): ``aten.cat([neg(slice(x,
-1, h, end)), slice(x, -1, 0, h)], -1)`` on a float32 ``x`` whose last dim D = 2h is static.
Produces ``linear(x, R)`` with ``R`` (D, D): ``R[j, j + h] = -1`` (j < h), ``R[j, j - h] = 1``
(j >= h), one constant ``fxport_rotate_half.<node>`` per site (a constant shared by several
XNNPACK delegates breaks ExecuTorch's emitter).
Leaves alone: other cats (not counted); rotate_half shapes of other dtypes, odd or dynamic D,
or other slice bounds (skip reasons). The rewritten program has no such cat left, so the pass
is idempotent.
Invariant: exact for finite inputs (each output is one input times +-1 plus zeros).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import add_constant, arg, call, val
from fxport.passes.match import Any, P, Seq, find_all

aten = torch.ops.aten

#: ``cat([neg(slice(x, ...)), slice(x, ...)], dim)``; slice bounds are checked in the pass
ROTATE_HALF = P(aten.cat.default,
                Seq(P(aten.neg.default, P(aten.slice.Tensor, Any("x"), name="high")),
                    P(aten.slice.Tensor, Any("x"), name="low")),
                name="cat")


def _slice_is(sl: Node, last: int, start: int, end: int, D: int) -> bool:
    """``sl`` = ``x[..., start:end]`` along the last dim (an end >= D counts as D)."""
    a = list(sl.args) + [None] * (5 - len(sl.args))
    d, s0, s1, step = a[1], a[2] or 0, a[3], a[4] or 1
    full_end = s1 == end or (end == D and s1 is not None and s1 >= D)
    return d in (-1, last) and s0 == start and full_end and step == 1


def rotate_half_slices(cat: Node, caps: dict, last: int, D: int) -> bool:
    """``cat`` (a :data:`ROTATE_HALF` match, ``caps`` its captures) joins ``-x[..., h:]`` and
    ``x[..., :h]`` along ``x``'s last dim ``last`` of size D = 2h: rotate_half's bounds exactly."""
    h = D // 2
    return (arg(cat, 1, "dim", 0) in (-1, last) and _slice_is(caps["high"], last, h, D, D)
            and _slice_is(caps["low"], last, 0, h, D))


def rotation(D: int) -> torch.Tensor:
    """(D, D) ``R`` with ``linear(x, R) == cat([-x[..., h:], x[..., :h]], -1)``, h = D // 2."""
    h = D // 2
    R = torch.zeros(D, D)
    idx = torch.arange(h)
    R[idx, idx + h] = -1.0
    R[idx + h, idx] = 1.0
    return R


class RotateHalfAsLinear(Pass):
    """``rotate_half`` as ``linear(x, R)`` (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node, caps in find_all(g, ROTATE_HALF):
            x = caps["x"]
            xval = val(x)
            if xval is None:
                continue
            stats.matched += 1
            D, last = xval.shape[-1], xval.dim() - 1
            if xval.dtype != torch.float32 or not isinstance(D, int) or D % 2:
                stats.skip("not fp32 or last dim odd / dynamic")
                continue
            if not rotate_half_slices(node, caps, last, D):
                stats.skip("not rotate_half's slices")
                continue
            # On the program's device: a meta-device program (no weights) gets a meta constant.
            weight = add_constant(ep, f"fxport_rotate_half.{node.name}", rotation(D).to(xval.device))
            with g.inserting_before(node):
                new = call(g, aten.linear.default, x, weight)  # (..., D)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            stats.rewritten += 1
        if stats.rewritten:
            g.eliminate_dead_code()
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["ROTATE_HALF", "RotateHalfAsLinear", "rotate_half_slices", "rotation"]
