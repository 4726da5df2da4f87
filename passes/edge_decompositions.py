"""EdgeDecompositions: ops ExecuTorch's edge conversion would decompose, written in the form the
decomposition gives, node by node.

``to_edge`` / ``to_edge_transform_and_lower`` run ``ExportedProgram.run_decompositions`` with
ExecuTorch's core-ATen table, twice for a partitioner that preserves ops (XNNPACK). Each call
re-exports the whole program under fake tensors: ~18 s of the 270M XNNPACK build, for a handful
of ops (the KV-cache ``index_copy``, ``transpose``, the mask's ``masked_fill`` / ``&`` /
``arange``). This pass writes those nodes in their decomposed form directly, so a program
without any other op of the table skips those re-exports (fxport's lowering skips a
``run_decompositions`` that has nothing to do: see ``lowering/xnnpack.py``).

Matches and produces (each the exact form ``run_decompositions`` gives, torch 2.13):

========================================  ==================================================
``transpose.int(x, a, b)``                ``permute.default(x, perm)`` (``a``, ``b`` swapped;
                                          ``alias.default(x)`` when ``a == b`` as written)
``index_copy.default(x, d, idx, src)``    ``index_put.default(x, [None] * d + [idx], src)``
``masked_fill.Scalar(x, mask, v)``        ``where.self(mask, scalar_tensor(v, dtype=x.dtype), x)``
``zeros_like.default(x, dtype=...)``      ``full_like.default(x, 0, dtype=..., memory_format=preserve)``
``arange.default(end, ...)``              ``arange.start_step(0, end, ..., layout=strided)``
``__and__.Tensor(a, b)``                  ``bitwise_and.Tensor(a, b)``
``reshape.default(x, shape)``             ``view.default(x, shape)`` when the strides allow a
                                          view, else ``view(clone(x, contiguous), shape)``
                                          (decided as torch decides it, on the fake input)
========================================  ==================================================

``reshape`` is not in the table but ``run_decompositions`` always decomposes it (a composite
view op cannot be preserved); fxport's ``SDPAAsMatmul`` writes it.

Leaves alone: every other op (``run_decompositions`` still handles what this pass does not
know), and ``zeros_like`` / ``arange`` / ``masked_fill`` with arguments outside the forms above
(non-default layout, memory format, a tensor fill value). Invariant: the same values, bit for
bit (index, layout and comparison ops: no arithmetic changes). Idempotent: no matched op is left.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import meta_val

aten = torch.ops.aten


def _zero(dtype: torch.dtype):
    """The fill value ``zeros_like``'s decomposition writes for ``dtype``."""
    if dtype is torch.bool:
        return False
    return 0.0 if dtype.is_floating_point or dtype.is_complex else 0


class EdgeDecompositions(Pass):
    """Write ops of ExecuTorch's decomposition table in their decomposed form (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if node.op != "call_function":
                continue
            target, args, kwargs = self._rewrite(node)
            if target is None:
                continue
            stats.matched += 1
            with g.inserting_before(node):
                new = g.call_function(target, args, kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            stats.rewritten += 1
            stats.sites.append({"node": new.name, "from": str(node.target), "to": str(target)})
        return PassResult(ep, stats.rewritten > 0, stats)

    def _rewrite(self, node):  # -> (target, args, kwargs) or (None, None, None)
        t, a, kw = node.target, node.args, dict(node.kwargs)
        none = (None, None, None)
        if t is aten.transpose.int:
            x, d0, d1 = a
            val = meta_val(x)
            if val is None:
                return none
            rank = val.dim()
            perm = list(range(rank))
            if d0 == d1:  # torch's decomposition: the same dim, as written, is an alias
                return aten.alias.default, (x,), {}
            d0, d1 = d0 % rank, d1 % rank
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return aten.permute.default, (x, perm), {}
        if t is aten.index_copy.default:
            x, dim, index, src = a
            val = meta_val(x)
            if val is None or val.dim() == 0:
                return none
            return aten.index_put.default, (x, [None] * (dim % val.dim()) + [index], src), {}
        if t is aten.reshape.default:
            return self._reshape(node)
        if t is aten.__and__.Tensor:
            return aten.bitwise_and.Tensor, a, kw
        if t is aten.masked_fill.Scalar:
            x, mask, value = a
            val = meta_val(x)
            if val is None or kw:
                return none
            g = node.graph
            with g.inserting_before(node):
                scalar = g.call_function(aten.scalar_tensor.default, (value,),
                                         {"dtype": val.dtype, "layout": torch.strided, "device": val.device})
            fake = getattr(val, "fake_mode", None)
            if fake is not None:
                with fake:
                    scalar.meta["val"] = torch.scalar_tensor(value, dtype=val.dtype, device=val.device)
            return aten.where.self, (mask, scalar, x), {}
        if t is aten.zeros_like.default:
            (x,) = a
            val = meta_val(x)
            if val is None or kw.get("layout") not in (None, torch.strided) or kw.get("memory_format") not in (
                    None, torch.preserve_format):
                return none
            dtype = kw.get("dtype") or val.dtype
            kw["memory_format"] = torch.preserve_format
            return aten.full_like.default, (x, _zero(dtype)), kw
        if t is aten.arange.default:
            (end,) = a
            if kw.get("layout") not in (None, torch.strided):
                return none
            kw["layout"] = torch.strided
            order = ["dtype", "layout", "device", "pin_memory"]
            return aten.arange.start_step, (0, end), {k: kw[k] for k in order if k in kw}
        return none

    @staticmethod
    def _reshape(node):
        """``reshape`` as torch's own decomposition resolves it for this input: a view when
        the strides allow one, else a contiguous copy viewed."""
        x, shape = node.args
        val = meta_val(x)
        fake = getattr(val, "fake_mode", None)
        if fake is None or node.kwargs:
            return None, None, None
        sizes = [meta_val(s) if isinstance(s, torch.fx.Node) else s for s in shape]
        if any(s is None for s in sizes):
            return None, None, None
        with fake:
            is_view = torch._C._is_alias_of(torch.ops.aten.reshape.default(val, sizes), val)
        if is_view:
            return aten.view.default, (x, shape), {}
        g = node.graph
        with g.inserting_before(node):
            copy = g.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        with fake:
            copy.meta["val"] = torch.ops.aten.clone.default(val, memory_format=torch.contiguous_format)
        return aten.view.default, (copy, shape), {}


__all__ = ["EdgeDecompositions"]
