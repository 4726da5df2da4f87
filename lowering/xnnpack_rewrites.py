"""Rewrites that let XNNPACK take whole layers instead of fragments (CPU pipeline only).

XNNPACK's partitioner leaves some ops to ExecuTorch's portable kernels; every such op splits
the delegate, so a Gemma layer used to become ~10 small XNNPACK subgraphs with single-threaded
portable ops between them (slow to run, and slow to lower: each subgraph is compiled
separately). Two patterns cause most of the splits; these passes rewrite them into ops XNNPACK
lowers, with the same numbers:

:class:`AdditiveAttentionMask`
    Matches ``aten.scaled_dot_product_attention`` with a bool ``attn_mask``. ExecuTorch
    decomposes a bool-mask SDPA into per-call ``where``/``any``/``logical_not`` ops (to zero
    rows with no visible key), none of which XNNPACK takes. Produces: one float mask
    ``where(mask, 0, -inf)`` per distinct bool mask node (shared by every layer reading it),
    passed to SDPA instead. Leaves alone: float masks, no mask. Invariant: identical output
    for every query row that sees at least one key (true for causal / sliding / ring masks,
    where each query sees itself); a row that sees no key gives NaN instead of 0.

:class:`RMSNormAsLinear`
    Matches ``aten.rms_norm(x, [D], weight, eps)`` on a float32 ``x``. The edge decomposition
    has ``mean(x*x, -1)``, which XNNPACK does not take on rank-3 tensors. Produces
    ``x * rsqrt(linear(x*x, full((1, D), 1/D)) + eps) * weight``: the mean as a matrix-vector
    product (one new (1, D) constant ``fxport_rms_mean.<node>`` per site: a constant read by
    several XNNPACK delegates breaks ExecuTorch's emitter). A weight computed from a
    parameter by ``add(param, scalar)`` (Gemma 3's ``1 + w``) is folded into a new constant
    ``<param>_plus_<scalar>`` so no portable ``add`` runs per call. Leaves alone: normalized
    shapes of more than one dim, non-fp32 inputs. Invariant: equal up to fp32 summation order
    (the mean is a dot product with 1/D instead of a sum divided by D; relative error ~1e-7).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import add_constant, call, input_spec, remove_unused_inputs, tensor_of

aten = torch.ops.aten


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


class AdditiveAttentionMask(Pass):
    """Bool SDPA masks become one shared additive float mask each (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        converted: dict[Node, Node] = {}
        for node in list(ep.graph.nodes):
            if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
                continue
            stats.matched += 1
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            mval, qval = _val(mask), _val(node.args[0])
            if mval is None or mval.dtype != torch.bool:
                stats.skip("no bool mask")
                continue
            if qval is None or not qval.dtype.is_floating_point:
                stats.skip("query dtype unknown")
                continue
            if mask not in converted:  # before its first SDPA; later readers come after it
                with ep.graph.inserting_before(node):
                    zeros = call(ep.graph, aten.zeros_like.default, mask, dtype=qval.dtype)
                    hidden = call(ep.graph, aten.logical_not.default, mask)
                    converted[mask] = call(ep.graph, aten.masked_fill.Scalar, zeros, hidden, float("-inf"))
            new = converted[mask]
            if len(node.args) > 3:
                args = list(node.args)
                args[3] = new
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "attn_mask": new}
            stats.rewritten += 1
        return PassResult(ep, stats.rewritten > 0, stats)


def _fold_offset_weight(ep: ExportedProgram, weight: Node) -> Node | None:
    """A constant for ``add(param, scalar)`` (or ``add(scalar-ish)``) of a parameter, else None."""
    if not (isinstance(weight, Node) and weight.op == "call_function"):
        return None
    if weight.target not in (aten.add.Tensor, aten.add.Scalar):
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
    tensor = tensor_of(ep, param)
    if tensor is None:
        return None
    target = f"{input_spec(ep, param).target}_plus_{scalar:g}".replace(".", "_")
    return add_constant(ep, target, (tensor.detach().float() + scalar).contiguous())


class RMSNormAsLinear(Pass):
    """``aten.rms_norm`` with the mean as a linear XNNPACK lowers (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        means: dict[int, Node] = {}
        g = ep.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not aten.rms_norm.default:
                continue
            stats.matched += 1
            x, shape = node.args[0], node.args[1]
            weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
            eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
            xval = _val(x)
            if xval is None or xval.dtype != torch.float32 or len(shape) != 1:
                stats.skip("not fp32 or normalized over more than one dim")
                continue
            if eps is None:
                eps = torch.finfo(torch.float32).eps
            D = int(shape[0])
            # One (1, D) constant per site: XNNPACK moves a constant into the one delegate that
            # reads it, and one shared by several delegates fails ExecuTorch's emitter.
            means[D] = add_constant(ep, f"fxport_rms_mean.{node.name}", torch.full((1, D), 1.0 / D))
            folded = _fold_offset_weight(ep, weight) if weight is not None else None
            with g.inserting_before(node):
                sq = call(g, aten.mul.Tensor, x, x)
                ms = call(g, aten.linear.default, sq, means[D])  # (..., 1) = mean(x^2, -1)
                inv = call(g, aten.rsqrt.default, call(g, aten.add.Tensor, ms, float(eps)))
                y = call(g, aten.mul.Tensor, x, inv)
                if weight is not None:
                    y = call(g, aten.mul.Tensor, y, folded if folded is not None else weight)
            node.replace_all_uses_with(y)
            g.erase_node(node)
            stats.rewritten += 1
            stats.sites.append({"node": node.name, "dim": D, "weight": "folded" if folded is not None else "as is"})
        if stats.rewritten:
            g.eliminate_dead_code()
            remove_unused_inputs(ep)
        return PassResult(ep, stats.rewritten > 0, stats)


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _peel_repeat_kv(node: Node) -> tuple[Node, int] | None:
    """``reshape(expand(unsqueeze(x, 2), (B, Hkv, n, S, D)), (B, Hkv * n, S, D))`` -> (x, n)."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _VIEWS):
        return None
    src = node.args[0]
    if isinstance(src, Node) and src.target is aten.clone.default:
        src = src.args[0]
    if not (isinstance(src, Node) and src.target is aten.expand.default):
        return None
    unsq = src.args[0]
    if not (isinstance(unsq, Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] == 2):
        return None
    x = unsq.args[0]
    xval, size = _val(x), src.args[1]
    if xval is None or xval.dim() != 4 or len(size) != 5 or not isinstance(size[2], int):
        return None
    return x, int(size[2])


class SDPAAsMatmul(Pass):
    """``aten.scaled_dot_product_attention`` as matmul / softmax / matmul, GQA folded for decode.

    Matches: SDPA with 4-d q (B, H_q, L, D), dropout 0, ``is_causal=False``, a float additive
    mask or none (run :class:`AdditiveAttentionMask` first for bool masks).
    Produces: ``softmax(q @ k^T * scale + mask) @ v``, ops XNNPACK lowers (the stock edge
    decomposition scales with ``mul.Scalar`` and guards fully-masked rows with ``where`` /
    ``any``, which it does not). When L == 1 and K/V come from the repeat_kv chain
    ``unsqueeze -> expand -> reshape``, the chain is peeled: q is viewed as (B, H_kv, n_rep, D)
    and multiplied with the un-expanded cache (B, H_kv, S, D), so the cache is never copied
    n_rep times per step. The same fold applies for L > 1 (prefill, also with a dynamic L) when
    the mask is (1, 1, L, S): q is reshaped to (B*H_kv, n_rep*L, D) and the mask added on a
    (B*H_kv, n_rep, L, S) view of the scores.
    Leaves alone: bool masks, causal / dropout SDPA, non-4-d inputs (counted as skipped).
    Invariant: equal up to fp32 summation order for rows that see at least one key.
    """

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
                continue
            stats.matched += 1
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            args = dict(zip(names, node.args))
            args.update(node.kwargs)
            q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
            qv, mv = _val(q), _val(mask)
            if args.get("dropout_p", 0.0) or args.get("is_causal", False) or args.get("enable_gqa", False):
                stats.skip("dropout, causal or enable_gqa")
                continue
            if qv is None or qv.dim() != 4 or _val(k) is None or _val(k).dim() != 4:
                stats.skip("inputs not 4-d")
                continue
            if mask is not None and (mv is None or mv.dtype == torch.bool):
                stats.skip("bool mask (run AdditiveAttentionMask first)")
                continue
            B, Hq, L, D = qv.shape
            scale = args.get("scale")
            scale = float(scale) if scale is not None else D ** -0.5
            pk, pv = _peel_repeat_kv(k), _peel_repeat_kv(v)
            peeled = pk is not None and pv is not None and pk[1] == pv[1] and isinstance(B, int)
            fold = peeled and isinstance(L, int) and L == 1 and (mask is None or mv.numel() == mv.shape[-1])
            # prefill (L > 1 or dynamic): same fold, the mask broadcast over (B*H_kv, n_rep)
            fold_many = (peeled and not fold and isinstance(Hq, int)
                         and (mask is None or (mv.dim() == 4 and mv.shape[0] == 1 and mv.shape[1] == 1)))
            with g.inserting_before(node):
                if fold_many:
                    (kx, n), (vx, _) = pk, pv
                    Hkv = Hq // n
                    S = _val(kx).shape[2]
                    # (B*H_kv, n_rep*L, D): query heads of one KV head are adjacent (repeat_kv order)
                    # (a contiguous copy viewed with -1, not a reshape: see SymbolicViewAsInferred)
                    qc = call(g, aten.clone.default, q, memory_format=torch.contiguous_format)
                    qg = call(g, aten.view.default, qc, [B * Hkv, -1, D])
                    k3 = call(g, aten.view.default, kx, [B * Hkv, S, D])
                    kt = call(g, aten.transpose.int, k3, 1, 2)  # (B*H_kv, D, S)
                    scores = call(g, aten.bmm.default, qg, kt)  # (B*H_kv, n_rep*L, S)
                    scores = call(g, aten.mul.Tensor, scores, scale)
                    if mask is not None:
                        scores = call(g, aten.view.default, scores, [B * Hkv, n, -1, S])  # (B*H_kv, n_rep, L, S)
                        scores = call(g, aten.add.Tensor, scores, mask)  # mask (1, 1, L, S) broadcasts
                        scores = call(g, aten.view.default, scores, [B * Hkv, -1, S])
                    probs = call(g, aten._softmax.default, scores, -1, False)
                    v3 = call(g, aten.view.default, vx, [B * Hkv, S, D])
                    out = call(g, aten.bmm.default, probs, v3)  # (B*H_kv, n_rep*L, D)
                    out = call(g, aten.view.default, out, [B, Hq, -1, D])  # (B, H_q, L, D)
                elif fold:
                    (kx, n), (vx, _) = pk, pv
                    Hkv = Hq // n
                    S = _val(kx).shape[2]
                    # 3-d bmm: a 4-d matmul would decompose with (no-op) expand copies of the cache
                    qg = call(g, aten.view.default, q, [B * Hkv, n, D])  # (B*H_kv, n_rep, D)
                    k3 = call(g, aten.view.default, kx, [B * Hkv, S, D])
                    kt = call(g, aten.transpose.int, k3, 1, 2)  # (B*H_kv, D, S)
                    scores = call(g, aten.bmm.default, qg, kt)  # (B*H_kv, n_rep, S)
                    if mask is not None:  # (1, 1, 1, S) -> (1, 1, S) to broadcast over B*H_kv
                        mask = call(g, aten.view.default, mask, [1, 1, _val(mask).shape[-1]])
                else:
                    kt = call(g, aten.transpose.int, k, 2, 3)
                    scores = call(g, aten.matmul.default, q, kt)  # (B, H_q, L, S)
                if not fold_many:
                    scores = call(g, aten.mul.Tensor, scores, scale)
                    if mask is not None:
                        scores = call(g, aten.add.Tensor, scores, mask)  # (1, 1, L, S) broadcasts
                    probs = call(g, aten._softmax.default, scores, -1, False)
                if fold:
                    v3 = call(g, aten.view.default, vx, [B * Hkv, S, D])
                    out = call(g, aten.bmm.default, probs, v3)  # (B*H_kv, n_rep, D)
                    out = call(g, aten.view.default, out, [B, Hq, 1, D])
                elif not fold_many:
                    out = call(g, aten.matmul.default, probs, v)
            # SDPA returns a (B, L, H, D)-strided tensor that callers view after transposing;
            # matmul's output is (B, H, L, D)-contiguous, so such views become reshapes.
            for user in list(node.users):
                if user.target is aten.transpose.int:
                    for view in user.users:
                        if view.target is aten.view.default:
                            view.target = aten.reshape.default
            node.replace_all_uses_with(out)
            g.erase_node(node)
            stats.rewritten += 1
            stats.sites.append({"node": node.name, "gqa_folded": fold or fold_many})
        if stats.rewritten:
            g.eliminate_dead_code()
        return PassResult(ep, stats.rewritten > 0, stats)


class SymbolicViewAsInferred(Pass):
    """A view whose target shape has one symbolic dim names it ``-1`` instead.

    XNNPACK's partitioner rejects ``view_copy`` with a symbolic size (``[1, s, 4, 256]`` from
    ``x.view(B, L, H, D)`` in a dynamic-length prefill) but takes one inferred dim
    (``[1, -1, 4, 256]``); each rejected view splits the delegate around it.
    Matches: ``aten.view`` / ``aten._unsafe_view`` / ``aten.reshape`` whose shape list has
    exactly one non-int entry and no ``-1``, and whose input and output shapes have the same
    number of elements. Produces: the same node with that entry replaced by ``-1`` (a reshape
    becomes ``view(clone(x, contiguous), shape)``: a reshape is decomposed later with its sizes
    recomputed, which would bring the symbolic dim back).
    Leaves alone: views with static shapes or several symbolic dims.
    Invariant: identical output shape (the inferred dim is the one symbolic dim).
    """

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        for node in ep.graph.nodes:
            if node.op != "call_function" or node.target not in _VIEWS or len(node.args) < 2:
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


class RotateHalfAsLinear(Pass):
    """RoPE's ``rotate_half`` as a linear with a constant signed permutation (prefill only matters).

    XNNPACK does not take ``slice_copy`` on a tensor with a dynamic dim, so in a dynamic-length
    prefill every ``rotate_half`` (``cat([-x[..., h:], x[..., :h]], -1)``, two per layer) splits
    the delegate around it. Matches: ``aten.cat([neg(slice(x, -1, h, end)), slice(x, -1, 0, h)],
    -1)`` on a float32 ``x`` whose last dim D = 2h is static. Produces ``linear(x, R)`` with
    ``R`` (D, D): ``R[j, j + h] = -1`` (j < h), ``R[j, j - h] = 1`` (j >= h), one constant
    ``fxport_rotate_half.<node>`` per site (see :class:`RMSNormAsLinear`). Leaves alone: other
    cats, odd or dynamic D. Invariant: exact for finite inputs (each output is one input times
    +-1 plus zeros).
    """

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not aten.cat.default:
                continue
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            out = _val(node)
            if len(parts) != 2 or out is None:
                continue
            neg, low = parts
            if not (isinstance(neg, Node) and neg.target is aten.neg.default and isinstance(low, Node)
                    and low.target is aten.slice.Tensor):
                continue
            high = neg.args[0]
            if not (isinstance(high, Node) and high.target is aten.slice.Tensor):
                continue
            x = high.args[0]
            xval = _val(x)
            if low.args[0] is not x or xval is None:
                continue
            stats.matched += 1
            D = xval.shape[-1]
            last = xval.dim() - 1
            if xval.dtype != torch.float32 or not isinstance(D, int) or D % 2:
                stats.skip("not fp32 or last dim odd / dynamic")
                continue
            h = D // 2

            def _is(sl, start, end) -> bool:
                a = list(sl.args) + [None] * (5 - len(sl.args))
                d, s0, s1, step = a[1], a[2] or 0, a[3], a[4] or 1
                return d in (-1, last) and s0 == start and (s1 == end or (end == D and s1 is not None and s1 >= D)) and step == 1

            if dim not in (-1, last) or not _is(high, h, D) or not _is(low, 0, h):
                stats.skip("not rotate_half's slices")
                continue
            R = torch.zeros(D, D)
            idx = torch.arange(h)
            R[idx, idx + h] = -1.0
            R[idx + h, idx] = 1.0
            weight = add_constant(ep, f"fxport_rotate_half.{node.name}", R)
            with g.inserting_before(node):
                new = call(g, aten.linear.default, x, weight)  # (..., D)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            stats.rewritten += 1
        if stats.rewritten:
            g.eliminate_dead_code()
        return PassResult(ep, stats.rewritten > 0, stats)
