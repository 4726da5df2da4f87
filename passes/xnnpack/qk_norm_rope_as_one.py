"""QKNormRopeAsOne: a layer's query and key heads normalized and rotated as one tensor.

Gemma normalizes queries and keys per head (``q_norm``, ``k_norm``: an RMSNorm over the head
dim D, each with its own weight) and rotates both with the same RoPE tables, written on
(B, H, L, D) after a ``transpose(1, 2)``; :class:`~fxport.passes.xnnpack.CustomSDPA` then permutes
both back to the kernel's (B, L, H, D). On XNNPACK that is, per layer, two runs of the same
operators: the norm (5 each once :class:`RMSNormAsLinear` has spelled it), the transposes (2
each), RoPE (4 each, one of them a (D, D) float32 rotation linear of 256 KiB at D = 256). Every
operator is set up again on every call of its delegate (~0.75 µs each on the project's machine).

Here the query and key heads are concatenated once, normalized and rotated once in the kernel's
layout, and split again where the chains end: the splits (``slice``) land outside XNNPACK,
between the delegate and ``custom_sdpa`` / the key cache's ``index_copy``, which are outside
it already. 26 XNNPACK operators a layer become 11, and one rotation weight is read instead of two.

Matches, per ``llama.custom_sdpa`` call: its query and the key written into the cache it reads
(``index_copy(cache, 1, pos, key)``, the cache read directly or through a prefix slice), each
``permute(rope(transpose(rms_norm(view(x, [B, L, H, D]), [D], w, eps), 1, 2)), [0, 2, 1, 3])``
with ``rope(t) = t * cos + rotate_half(t) * sin`` (operands in either order; ``rotate_half`` as
:data:`~fxport.passes.xnnpack.rotate_half_as_linear.ROTATE_HALF` spells it), the query and the
key chain with the same B, L, D (static, even), eps, ``cos`` and ``sin`` nodes, norm weights that
are constants (a parameter, buffer or constant, or ``param + c``; None counts as ones), tables of
shape (L, D), (1, L, D) or (B', 1, L, D), and every intermediate read by its chain only.
Produces: ``x = cat([q_view, k_view], 2)`` (B, L, Hq + Hk, D);
``n = rms_norm(x, [D], None, eps) * W`` with ``W`` (Hq + Hk, D) the query weight on every query
head and the key weight on every key head (one constant ``fxport_qk_norm.<sdpa>`` per site);
``r = n * cos' + rotate_half(n) * sin'`` with the tables given a head axis (a ``view`` with L as -1;
one per table, shared by the sites); the query
``slice(r, 2, 0, Hq)`` and the key ``slice(r, 2, Hq, Hq + Hk)``, each (B, L, H, D).
Leaves alone (skip reasons): sites where either chain differs from the above, e.g. the norm
after the transpose (transformers' Gemma 3, whose norm is a pow / mean / rsqrt chain, not
``rms_norm``); programs without ``custom_sdpa`` (attention in XNNPACK keeps (B, H, L, D)). The
rewritten sites have no transpose left, so the pass is idempotent.
Invariant: the same arithmetic per element (each head's mean over D, its weight, its rotation):
equal up to fp32 rounding of the norm's summation order.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import add_constant, arg, call, dims_equal, shape, tensor_of, val
from fxport.passes.match import is_op, match
from fxport.passes.xnnpack.custom_sdpa import swaps_1_2
from fxport.passes.xnnpack.rms_norm_as_linear import offset_parameter
from fxport.passes.xnnpack.rotate_half_as_linear import ROTATE_HALF, rotate_half_slices

aten = torch.ops.aten
llama = getattr(torch.ops, "llama", None)

class _Skip(Exception):
    """A site that does not have the pass's form; the message is the skip reason."""


def _only_user(node: Node, user: Node) -> bool:
    return list(node.users) == [user]


def _constant_value(ep: ExportedProgram, node) -> torch.Tensor | None:
    """The tensor behind ``node``: a parameter, buffer or constant placeholder, or ``param + c``."""
    if isinstance(node, Node) and node.op == "placeholder":
        return tensor_of(ep, node)  # None for a user input
    offset = offset_parameter(ep, node)
    if offset is None:
        return None
    param, scalar = offset
    return tensor_of(ep, param).detach().float() + scalar


def _rope(out: Node) -> tuple[Node, Node, Node, list[Node]]:
    """``out = t * cos + rotate_half(t) * sin``: (t, cos, sin, the chain's nodes)."""
    if not is_op(out, aten.add.Tensor) or len(out.args) != 2 or out.kwargs.get("alpha", 1) != 1:
        raise _Skip("RoPE's sum not found")
    for a, b in (out.args, out.args[::-1]):
        if not (is_op(a, aten.mul.Tensor) and is_op(b, aten.mul.Tensor)):
            continue
        for rot, sin in (b.args, b.args[::-1]):
            caps = match(ROTATE_HALF, rot)
            if caps is None:
                continue
            t = caps["x"]
            if t not in a.args or not isinstance(sin, Node):
                continue
            cos = a.args[1] if a.args[0] is t else a.args[0]
            D, last = shape(t)[-1], len(shape(t)) - 1
            if not (isinstance(cos, Node) and isinstance(D, int) and rotate_half_slices(rot, caps, last, D)):
                continue
            chain = [out, a, b, rot, caps["high"], caps["low"], rot.args[0][0]]
            return t, cos, sin, chain
    raise _Skip("not t * cos + rotate_half(t) * sin")


def _chain(end: Node, consumer: Node) -> dict:
    """The query / key chain ending in ``end`` (read by ``consumer`` only): its view, norm and tables."""
    if not (swaps_1_2(end) and _only_user(end, consumer)):
        raise _Skip("the attention input is not a permute to (B, L, H, D)")
    out = end.args[0]
    if not _only_user(out, end):
        raise _Skip("RoPE's result has other readers")
    t, cos, sin, rope_nodes = _rope(out)
    if not swaps_1_2(t):
        raise _Skip("RoPE not applied on the (B, H, L, D) transpose")
    if any(u not in rope_nodes for u in t.users):
        raise _Skip("the transposed heads have other readers")
    norm = t.args[0]
    if not (is_op(norm, aten.rms_norm.default) and _only_user(norm, t)):
        raise _Skip("no per-head rms_norm before RoPE")
    view = norm.args[0]
    s = shape(view)
    if s is None or len(s) != 4 or len(norm.args[1]) != 1 or not dims_equal(norm.args[1][0], s[-1]):
        raise _Skip("the norm is not over the last dim of (B, L, H, D)")
    if not _only_user(view, norm):
        raise _Skip("the heads before the norm have other readers")
    return {"view": view, "shape": s, "weight": arg(norm, 2, "weight"), "eps": arg(norm, 3, "eps"),
            "cos": cos, "sin": sin}


def _key_written(k_cache: Node) -> tuple[Node, Node]:
    """The ``index_copy`` the kernel's key cache comes from (directly or a prefix slice) and the key it writes."""
    write = k_cache
    while is_op(write, aten.slice.Tensor):
        write = write.args[0]
    if not (is_op(write, aten.index_copy.default) and write.args[1] == 1):
        raise _Skip("the key cache is not written by index_copy(cache, 1, pos, key)")
    return write, write.args[3]


def _head_axis(g, table: Node, memo: dict) -> Node:
    """``table`` broadcast over (B, L, H, D) as it was over (B, H, L, D): a head axis at -2, as a
    view with L as ``-1`` (XNNPACK delegates it; an ``unsqueeze`` of a dynamic L it leaves out)."""
    if table in memo:
        return memo[table]
    s = shape(table)
    if len(s) == 2:
        sizes = [-1, 1, s[1]]
    elif len(s) == 3 and s[0] == 1:
        sizes = [1, -1, 1, s[2]]
    elif len(s) == 4 and s[1] == 1 and isinstance(s[0], int):
        sizes = [s[0], -1, 1, s[3]]
    else:
        raise _Skip(f"RoPE table of shape {tuple(s)}")
    if not isinstance(sizes[-1], int):
        raise _Skip("RoPE table with a dynamic last dim")
    with g.inserting_after(table):
        new = call(g, aten.view.default, table, sizes)
    memo[table] = new
    return new


class QKNormRopeAsOne(Pass):
    """Query and key heads normalized and rotated as one tensor (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        if llama is None or not hasattr(llama, "custom_sdpa"):
            return PassResult(ep, False, stats)
        tables: dict[Node, Node] = {}
        for sdpa in [n for n in g.nodes if is_op(n, llama.custom_sdpa.default)]:
            stats.matched += 1
            try:
                write, key_end = _key_written(sdpa.args[1])
                q = _chain(sdpa.args[0], sdpa)
                k = _chain(key_end, write)
                W = self._weights(ep, q, k)
                if q["cos"] is not k["cos"] or q["sin"] is not k["sin"]:
                    raise _Skip("query and key rotated with different tables")
                for t in ("cos", "sin"):
                    ts = shape(q[t])
                    if ts is None or not (dims_equal(ts[-1], q["shape"][-1]) and dims_equal(ts[-2], q["shape"][1])):
                        raise _Skip("RoPE tables are not (..., L, D)")
                cos, sin = _head_axis(g, q["cos"], tables), _head_axis(g, q["sin"], tables)
            except _Skip as why:
                stats.skip(str(why))
                continue
            (B, L, Hq, D), Hk = q["shape"], k["shape"][2]
            weight = add_constant(ep, f"fxport_qk_norm.{sdpa.name}", W.to(val(q["view"]).device)) if W is not None else None
            order = {n: i for i, n in enumerate(g.nodes)}
            latest = max((q["view"], k["view"], cos, sin), key=order.__getitem__)
            h = D // 2
            with g.inserting_before(latest.next):  # in creation order after ``latest``
                x = call(g, aten.cat.default, [q["view"], k["view"]], 2)  # (B, L, Hq + Hk, D)
                n = call(g, aten.rms_norm.default, x, [D], None, q["eps"])
                if weight is not None:
                    n = call(g, aten.mul.Tensor, n, weight)
                rot = call(g, aten.cat.default, [call(g, aten.neg.default, call(g, aten.slice.Tensor, n, 3, h, D)),
                                                 call(g, aten.slice.Tensor, n, 3, 0, h)], -1)
                r = call(g, aten.add.Tensor, call(g, aten.mul.Tensor, n, cos), call(g, aten.mul.Tensor, rot, sin))
                q_new = call(g, aten.slice.Tensor, r, 2, 0, Hq)  # (B, L, Hq, D)
                k_new = call(g, aten.slice.Tensor, r, 2, Hq, Hq + Hk)  # (B, L, Hk, D)
            sdpa.replace_input_with(sdpa.args[0], q_new)
            write.replace_input_with(key_end, k_new)
            stats.rewritten += 1
            stats.sites.append({"sdpa": sdpa.name, "heads": [Hq, Hk], "dim": D})
        if stats.rewritten or tables:  # a table given a head axis for a site skipped later is dead too
            g.eliminate_dead_code()
        return PassResult(ep, stats.rewritten > 0, stats)

    @staticmethod
    def _weights(ep: ExportedProgram, q: dict, k: dict) -> torch.Tensor | None:
        """(Hq + Hk, D): the query norm's weight per query head, the key norm's per key head."""
        (B, L, Hq, D), (kB, kL, Hk, kD) = q["shape"], k["shape"]
        if not (dims_equal(B, kB) and dims_equal(L, kL) and dims_equal(D, kD)) or not isinstance(D, int) or D % 2:
            raise _Skip("query and key heads differ in B, L or D, or D is dynamic / odd")
        if q["eps"] != k["eps"]:
            raise _Skip("query and key norms with different eps")
        if val(q["view"]) is None or val(q["view"]).dtype != val(k["view"]).dtype:
            raise _Skip("query and key of different dtypes")
        if q["weight"] is None and k["weight"] is None:
            return None
        w = []
        for side, heads in ((q, Hq), (k, Hk)):
            value = torch.ones(D, device=val(q["view"]).device) if side["weight"] is None else _constant_value(ep, side["weight"])
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (D,):
                raise _Skip("a norm weight that is not a constant of shape (D,)")
            w.append(value.detach().to(val(q["view"]).dtype).expand(heads, D))
        return torch.cat(w).contiguous()


__all__ = ["QKNormRopeAsOne"]
