"""RMSNormAsLinear: ``aten.rms_norm`` with the mean as a linear XNNPACK lowers.

The edge decomposition of ``rms_norm`` has ``mean(x*x, -1)``, which XNNPACK does not take on
rank-3 tensors.

Matches: ``aten.rms_norm(x, [D], weight, eps)`` on a float32 ``x`` (``eps`` None = fp32 eps).
Produces ``x * rsqrt(linear(x*x, full((1, D), 1/D), bias=full((1,), eps))) * weight``: the mean
as a matrix-vector product with ``eps`` as its bias (one operator fewer than a separate add: 6
a layer on Gemma 3, each set up on every delegate call). Two new constants per site,
``fxport_rms_mean.<node>`` (1, D) and ``fxport_rms_eps.<node>`` (1,): a constant read by several
XNNPACK delegates breaks ExecuTorch's emitter. A weight computed
from a parameter by ``add(param, scalar)`` (Gemma 3's ``1 + w``) is folded into a new
constant ``<param>_plus_<scalar>`` so no portable ``add`` runs per call.
Leaves alone (skip reason): normalized shapes of more than one dim, non-fp32 inputs. The
rewritten program has no ``rms_norm`` left, so the pass is idempotent.
Invariant: equal up to fp32 summation order (the mean is a dot product with 1/D instead of a
sum divided by D, ``eps`` added by the linear; relative error ~1e-7).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import add_constant, arg, call, input_spec, remove_unused_inputs, tensor_of, val
from fxport.passes.match import is_op

aten = torch.ops.aten


def offset_parameter(ep: ExportedProgram, weight) -> tuple[Node, float] | None:
    """``(param, c)`` when ``weight`` is ``add(param, c)`` (either order, alpha 1) of a parameter,
    buffer or constant placeholder with a value (Gemma's ``1 + w``), else None."""
    if not is_op(weight, aten.add.Tensor, aten.add.Scalar):
        return None
    param, scalar = weight.args[0], weight.args[1]
    if isinstance(param, (int, float)) and isinstance(scalar, Node):
        param, scalar = scalar, param
    if not (isinstance(param, Node) and param.op == "placeholder" and isinstance(scalar, (int, float))):
        return None
    if input_spec(ep, param).kind not in (InputKind.PARAMETER, InputKind.CONSTANT_TENSOR, InputKind.BUFFER):
        return None
    if len(weight.args) > 2 or weight.kwargs.get("alpha", 1) != 1:
        return None
    return (param, scalar) if tensor_of(ep, param) is not None else None


def _fold_offset_weight(ep: ExportedProgram, weight: Node) -> Node | None:
    """A constant for ``add(param, scalar)`` (either order) of a parameter, else None."""
    offset = offset_parameter(ep, weight)
    if offset is None:
        return None
    param, scalar = offset
    target = f"{input_spec(ep, param).target}_plus_{_name_of(scalar)}".replace(".", "_")
    return add_constant(ep, target, (tensor_of(ep, param).detach().float() + scalar).contiguous())


def _name_of(scalar: float) -> str:
    """``scalar`` as an identifier part, exact: 1 -> "1", -1 -> "minus1", 1e-05 -> "1eminus05",
    1.0000001 -> "1p0000001" (a ``:g`` spelling made "-1" and "1e-05" invalid names and gave 1.0
    and 1.0000001 the same one)."""
    text = str(int(scalar)) if float(scalar).is_integer() else repr(float(scalar))
    return text.replace("-", "minus").replace("+", "").replace(".", "p")


class RMSNormAsLinear(Pass):
    """``aten.rms_norm`` with the mean as a linear XNNPACK lowers (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if not is_op(node, aten.rms_norm.default):
                continue
            stats.matched += 1
            x, shape = node.args[0], node.args[1]
            weight, eps = arg(node, 2, "weight"), arg(node, 3, "eps")
            xval = val(x)
            if xval is None or xval.dtype != torch.float32 or len(shape) != 1:
                stats.skip("not fp32 or normalized over more than one dim")
                continue
            if eps is None:
                eps = torch.finfo(torch.float32).eps
            D = int(shape[0])
            # One (1, D) constant per site: XNNPACK moves a constant into the one delegate that
            # reads it, and one shared by several delegates fails ExecuTorch's emitter.
            # On the program's device: a meta-device program (no weights) gets a meta constant.
            mean = add_constant(ep, f"fxport_rms_mean.{node.name}", torch.full((1, D), 1.0 / D, device=xval.device))
            eps_bias = add_constant(ep, f"fxport_rms_eps.{node.name}", torch.full((1,), float(eps), device=xval.device))
            folded = _fold_offset_weight(ep, weight) if weight is not None else None
            with g.inserting_before(node):
                sq = call(g, aten.mul.Tensor, x, x)
                ms_eps = call(g, aten.linear.default, sq, mean, eps_bias)  # (..., 1) = mean(x^2, -1) + eps
                inv = call(g, aten.rsqrt.default, ms_eps)
                y = call(g, aten.mul.Tensor, x, inv)
                if weight is not None:
                    y = call(g, aten.mul.Tensor, y, folded if folded is not None else weight)
            y.meta["val"] = node.meta.get("val")  # a norm reading this one sees its shape and dtype
            node.replace_all_uses_with(y)
            g.erase_node(node)
            stats.rewritten += 1
            stats.sites.append({"node": node.name, "dim": D, "weight": "folded" if folded is not None else "as is"})
        if stats.rewritten:
            g.eliminate_dead_code()
            remove_unused_inputs(ep)
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["RMSNormAsLinear", "offset_parameter"]
