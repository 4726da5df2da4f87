"""The one recognizer of attention in an exported graph: SDPA sites, K/V reader chains, cache writes.

Every fxport pass that touches attention (RingBufferKVCache, SDPADispatch, the XNNPACK
rewrites) reads the graph through this module, so two passes cannot disagree about the same
graph. It works on functional ATen IR (``ep.run_decompositions({})``, what the pipeline hands
to passes) and recognizes the in-place spellings of torch.export's training IR as well.

Vocabulary (op groups as data): :data:`SDPA_OPS`, :data:`VIEW_OPS`, :data:`COPY_LIKE`,
:data:`REPEAT_OPS`, :data:`CACHE_WRITES`.

SDPA arguments, read one way (positional or keyword)::

    a = sdpa_args(node)          # SDPAArgs(query, key, value, attn_mask, dropout_p,
                                 #          is_causal, scale, enable_gqa)
    a.scale_for(head_dim)        # the explicit scale, or 1/sqrt(head_dim)
    set_sdpa_arg(node, "attn_mask", new_mask)

K/V reader chains, peeled to the tensor that holds the K/V heads (the cache)::

    kv = peel_kv(sdpa_args(node).key, h_q=H_q, enable_gqa=a.enable_gqa)
    kv.source     # (B, H_kv, S, D) node, e.g. the cache's index_copy result
    kv.n_rep      # query heads per KV head (1 when nothing is repeated)
    kv.chain      # the nodes between source and the SDPA argument, outermost first
    kv.spelling   # "direct" | "repeat_kv" | "repeat_interleave" | "enable_gqa" (joined by "+")

  Recognized between the cache and SDPA, in any number and order: ``aten.repeat_interleave
  (x, n, dim=1)`` (any n, including 1); the repeat_kv chain ``unsqueeze(x, 2)`` (the ATen form of
  ``x[:, :, None]``) ``-> expand(B, H_kv, n, S, D) -> [clone] -> view/_unsafe_view/reshape(B,
  H_kv * n, S, D)``, which is also what ``repeat_interleave`` decomposes to; value-preserving
  ops that keep the shape (:data:`COPY_LIKE`, full slices, same-shape views/expands);
  ``enable_gqa=True`` (H_kv < H_q read directly). Repeats in another head order
  (``aten.repeat``, ``expand`` of a non-unsqueezed dim) end the chain: the source is then the
  repeated tensor, which is always correct, just not native GQA.

Cache writes (the one write of a cache buffer)::

    w = cache_write(node)        # CacheWrite(kind, cache, dim, value, positions | start/end,
                                 #            length, aux, inplace)
    w = find_cache_write(ep, "model.layers.0.self_attn.k_cache")

  ``index_copy(cache, d, pos, new)`` (HF static cache, ExecuTorch), ``index_put(cache, [None,
  None, pos], new)`` (``cache[:, :, pos] = new``: gpt-fast, torchtune, and what index_copy
  decomposes to), ``slice_scatter(cache, copy(slice(cache, d, p, p + L), new), d, p, p + L)``
  (``cache.narrow(d, p, L).copy_(new)`` / ``cache[:, :, p:p + L] = new`` with a symbolic start,
  ExecuTorch's dynamic-shape Llama), and the in-place forms ``index_copy_``, ``index_put_`` and
  ``copy_`` into a ``slice``/``narrow`` of the cache (training IR). Anything else raises
  :class:`NotRecognized` whose message is the skip reason passes report.

Node readers (``val``, ``shape``, ``shapes_equal``) and symbol bounds (``upper_bound``, e.g.
of ``write.length``: the most rows one cache write writes per call) are
:mod:`fxport.passes.graph`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.graph import (
    arg,
    buffer_placeholders,
    mutated_buffers,
    plain_shape,
    shape,
    shapes_equal,
    target_name,
    val,
)
from fxport.passes.match import Any as AnyP, Const, P, Through, is_op, match

aten = torch.ops.aten

# ------------------------------------------------------------------------------ op groups

SDPA_OPS = frozenset({aten.scaled_dot_product_attention.default})
VIEW_OPS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
#: value-preserving single-input ops (``_to_copy`` may change the dtype: callers check it)
COPY_LIKE = frozenset({
    aten._to_copy.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
    aten.detach.default, aten.lift_fresh_copy.default,
})
REPEAT_OPS = frozenset({aten.repeat_interleave.self_int})
EXPAND_OPS = frozenset({aten.expand.default})
UNSQUEEZE_OPS = frozenset({aten.unsqueeze.default})
SLICE_OPS = frozenset({aten.slice.Tensor})
NARROW_OPS = frozenset({aten.narrow.default})
INDEX_COPY = frozenset({aten.index_copy.default, aten.index_copy_.default})
INDEX_PUT = frozenset({aten.index_put.default, aten.index_put_.default})
SLICE_SCATTER = frozenset({aten.slice_scatter.default})
COPY_INTO = frozenset({aten.copy_.default, aten.copy.default})
CACHE_WRITES = INDEX_COPY | INDEX_PUT | SLICE_SCATTER | COPY_INTO
INPLACE_WRITES = frozenset({aten.index_copy_.default, aten.index_put_.default, aten.copy_.default})

#: ``unsqueeze(x, 2) -> [copy-like / slices] -> expand -> [clone] -> view``: repeat_kv, and the
#: decomposition of ``repeat_interleave(x, n, dim=1)``. Shapes are checked by :func:`peel_kv`.
REPEAT_KV = P(
    VIEW_OPS,
    Through(COPY_LIKE | SLICE_OPS,
            P(EXPAND_OPS, Through(COPY_LIKE | SLICE_OPS, P(UNSQUEEZE_OPS, AnyP("x"), Const(name="dim"))),
              name="expand")),
    name="view",
)


class NotRecognized(Exception):
    """A graph form the recognizer cannot prove; ``str(exc)`` is the skip reason."""


# ------------------------------------------------------------------------------ SDPA arguments

SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass(frozen=True)
class SDPAArgs:
    """``aten.scaled_dot_product_attention``'s arguments, whether passed by position or keyword."""

    node: Node
    query: Node
    key: Node
    value: Node
    attn_mask: Node | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool

    def scale_for(self, head_dim: int) -> float:
        """The scale SDPA applies: the explicit one, or ``1 / sqrt(head_dim)``."""
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(head_dim)


def is_sdpa(node: Any) -> bool:
    return is_op(node, SDPA_OPS)


def sdpa_args(node: Node) -> SDPAArgs:
    """Read an SDPA node's arguments (raises NotRecognized for other nodes)."""
    if not is_sdpa(node):
        raise NotRecognized(f"not an SDPA: {target_name(node)}")
    args = dict(SDPA_DEFAULTS)
    args.update(zip(SDPA_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return SDPAArgs(node=node, query=args["query"], key=args["key"], value=args["value"],
                    attn_mask=args["attn_mask"], dropout_p=float(args["dropout_p"] or 0.0),
                    is_causal=bool(args["is_causal"]), scale=args["scale"], enable_gqa=bool(args["enable_gqa"]))


def set_sdpa_arg(node: Node, name: str, value: Any) -> None:
    """Replace one SDPA argument where it is (positional or keyword)."""
    index = SDPA_ARG_NAMES.index(name)
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


# ------------------------------------------------------------------------------ K/V reader chains


@dataclass(frozen=True)
class KVSource:
    """What an SDPA key/value argument reads, with the head repetition peeled off."""

    source: Node  # (B, H_kv, S, D)
    n_rep: int  # query heads per KV head the chain (or enable_gqa) implies
    chain: tuple[Node, ...]  # nodes from the SDPA argument back to source (exclusive), outermost first
    spelling: str  # "direct" | "repeat_kv" | "repeat_interleave" | "enable_gqa", joined by "+"


def _transparent(node: Node) -> bool:
    """A single-input op whose output has its input's shape and values (dtype may change)."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.args and isinstance(node.args[0], Node)):
        return False
    if not shapes_equal(shape(node), shape(node.args[0])):
        return False
    if node.target in COPY_LIKE:
        return True
    if node.target in SLICE_OPS:  # a full slice: same shape means nothing was cut
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        return step in (1, None)
    return node.target in VIEW_OPS or node.target in EXPAND_OPS


def _repeat_interleave(node: Node) -> int | None:
    """n of ``repeat_interleave(x, n, dim=1)`` on a rank-4 x, else None."""
    if not is_op(node, REPEAT_OPS):
        return None
    names = ("self", "repeats", "dim", "output_size")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    xs = shape(a["self"])
    if xs is None or len(xs) != 4 or not isinstance(a["repeats"], int) or a.get("dim") not in (1, -3):
        return None
    return a["repeats"]


def peel_kv(node: Node, h_q: int | None = None, enable_gqa: bool = False) -> KVSource:
    """Peel the GQA expansion between an SDPA key/value argument and the tensor it repeats.

    ``h_q``: the query's head count; when given, ``H_kv * n_rep == h_q`` is checked.
    Raises NotRecognized when the argument is not rank 4 or the heads do not add up.
    """
    if shape(node) is None or len(shape(node)) != 4:
        raise NotRecognized("K/V without a 4-d shape")
    chain: list[Node] = []
    spellings: list[str] = []
    n_rep, cur = 1, node
    while True:
        if _transparent(cur):
            chain.append(cur)
            cur = cur.args[0]
            continue
        n = _repeat_interleave(cur)
        if n is not None:
            chain.append(cur)
            spellings.append("repeat_interleave")
            n_rep *= n
            cur = cur.args[0]
            continue
        caps = match(REPEAT_KV, cur)
        if caps is not None:
            x, expand = caps["x"], caps["expand"]
            xs, es, vs = shape(x), shape(expand), shape(cur)
            if caps["dim"] not in (2, -3) or xs is None or len(xs) != 4:
                raise NotRecognized("K/V expand not preceded by unsqueeze(2) (not the repeat_kv layout)")
            b, h, s, d = xs
            n = es[2] if es is not None and len(es) == 5 else None
            if (not isinstance(n, int) or not shapes_equal(es, (b, h, n, s, d)) or not isinstance(h, int)
                    or not shapes_equal(vs, (b, h * n, s, d))):
                raise NotRecognized(f"repeat_kv shapes {plain_shape(xs)} -> {plain_shape(es)} -> {plain_shape(vs)} do not match")
            while cur is not x:
                chain.append(cur)
                cur = cur.args[0]
            spellings.append("repeat_kv")
            n_rep *= n
            continue
        break
    src_shape = shape(cur)
    if src_shape is None or len(src_shape) != 4:
        raise NotRecognized("K/V source without a 4-d shape")
    h_kv = src_shape[1]
    if enable_gqa and h_q is not None and isinstance(h_kv, int) and h_kv * n_rep != h_q:
        if h_q % (h_kv * n_rep):
            raise NotRecognized(f"enable_gqa with {h_kv * n_rep} K/V heads that do not divide {h_q} query heads")
        n_rep = h_q // h_kv
        spellings.append("enable_gqa")
    if h_q is not None and (not isinstance(h_kv, int) or h_kv * n_rep != h_q):
        raise NotRecognized(f"K/V heads {plain_shape((h_kv,))[0]} x {n_rep} repeats do not give the query's {h_q} heads")
    return KVSource(cur, n_rep, tuple(chain), "+".join(spellings) or "direct")


@dataclass(frozen=True)
class AttentionSite:
    """One SDPA call with its K and V peeled to their sources (:func:`attention_site`)."""

    args: SDPAArgs
    key: KVSource
    value: KVSource
    n_rep: int  # query heads per KV head (K and V agree)

    @property
    def node(self) -> Node:
        return self.args.node


def attention_site(node: Node) -> AttentionSite:
    """Read one SDPA call: arguments and K/V sources (raises NotRecognized with the reason).

    Requires a 4-d query with a static head count, K and V sources of one shape, and K and V
    repeated alike.
    """
    a = sdpa_args(node)
    qs = shape(a.query)
    if qs is None or len(qs) != 4:
        raise NotRecognized("query not 4-d")
    h_q = qs[1]
    if not isinstance(h_q, int):
        raise NotRecognized("symbolic query heads")
    k = peel_kv(a.key, h_q, a.enable_gqa)
    v = peel_kv(a.value, h_q, a.enable_gqa)
    if k.n_rep != v.n_rep:
        raise NotRecognized(f"K repeated {k.n_rep}x but V {v.n_rep}x")
    ks, vs = shape(k.source), shape(v.source)
    if not shapes_equal(ks[:3], vs[:3]):
        raise NotRecognized(f"K {plain_shape(ks)} and V {plain_shape(vs)} sources differ in shape")
    return AttentionSite(a, k, v, k.n_rep)


def attention_sites(graph: torch.fx.Graph) -> list[tuple[Node, AttentionSite | NotRecognized]]:
    """Every SDPA node of ``graph`` in order, with its site or the reason it is not recognized."""
    out: list[tuple[Node, AttentionSite | NotRecognized]] = []
    for node in graph.nodes:
        if is_sdpa(node):
            try:
                out.append((node, attention_site(node)))
            except NotRecognized as exc:
                out.append((node, exc))
    return out


# ------------------------------------------------------------------------------ cache writes


@dataclass(frozen=True)
class CacheWrite:
    """The write of new rows into a cache along its sequence dim."""

    node: Node  # the write: its result is the new cache (functional) or it mutates ``cache`` (in place)
    kind: str  # "index_copy" | "index_put" | "slice_scatter" | "copy_slice"
    cache: Node  # the cache tensor written (a buffer placeholder in exported programs)
    dim: int  # the written dim, >= 0
    value: Node  # the rows written, (..., L, ...) along ``dim``
    positions: Node | None  # (L,) int positions (index_copy / index_put), else None
    start: Any  # slice forms: start position (int or a node producing a SymInt); else None
    end: Any  # slice forms: end position; else None
    length: Any  # L: rows written per call (int or SymInt)
    aux: tuple[Node, ...]  # nodes that read the cache only to build this write (slice, copy)
    inplace: bool


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def cache_write(node: Node) -> CacheWrite:
    """Read ``node`` as a cache write (one of :data:`CACHE_WRITES`), or raise NotRecognized."""
    if not is_op(node, CACHE_WRITES):
        raise NotRecognized(f"cache written by {target_name(node)}")
    inplace = node.target in INPLACE_WRITES
    cache = node.args[0]
    cs = shape(cache)
    if cs is None:
        raise NotRecognized("cache without a shape")
    rank = len(cs)
    if node.target in INDEX_COPY:
        dim, pos, value = _dim(node.args[1], rank), node.args[2], node.args[3]
        ps = shape(pos)
        if ps is None or len(ps) != 1:
            raise NotRecognized("index_copy index is not 1-D")
        return CacheWrite(node, "index_copy", cache, dim, value, pos, None, None, ps[0], (), inplace)
    if node.target in INDEX_PUT:
        indices, value = node.args[1], node.args[2]
        if arg(node, 3, "accumulate", False):
            raise NotRecognized("index_put with accumulate=True")
        given = [i for i, t in enumerate(indices) if t is not None]
        if len(given) != 1:
            raise NotRecognized("index_put with more than one index tensor")
        dim, pos = given[0], indices[given[0]]
        ps, pv = shape(pos), val(pos)
        if ps is None or len(ps) != 1 or pv.dtype in (torch.bool, torch.uint8):
            raise NotRecognized("index_put index is not a 1-D position tensor")
        return CacheWrite(node, "index_put", cache, dim, value, pos, None, None, ps[0], (), inplace)
    if node.target in SLICE_SCATTER:
        src = node.args[1]
        dim = _dim(arg(node, 2, "dim", 0), rank)
        start, end = arg(node, 3, "start"), arg(node, 4, "end")
        if arg(node, 5, "step", 1) != 1:
            raise NotRecognized("slice_scatter with a step")
        aux: tuple[Node, ...] = ()
        value = src
        if is_op(src, aten.copy.default):
            sl = src.args[0]
            if not (is_op(sl, SLICE_OPS) and sl.args[0] is cache and _dim(sl.args[1], rank) == dim
                    and sl.args[2] is start and sl.args[3] is end):
                raise NotRecognized("slice_scatter of a copy into another slice")
            if not shapes_equal(shape(src.args[1]), shape(sl)):
                raise NotRecognized("slice_scatter source broadcast into the slice")
            value, aux = src.args[1], (src, sl)
        if start is None or end is None:
            raise NotRecognized("slice_scatter without start and end")
        return CacheWrite(node, "slice_scatter", cache, dim, value, None, start, end, shape(value)[dim], aux, inplace)
    # copy_(slice(cache, d, start, end), new) / copy_(narrow(cache, d, start, L), new): in place
    # into a narrowed slice (training IR)
    sl = node.args[0]
    if not (is_op(sl, SLICE_OPS | NARROW_OPS) and isinstance(sl.args[0], Node)):
        raise NotRecognized("copy_ into something other than a slice of the cache")
    cache = sl.args[0]
    dim = _dim(sl.args[1] if len(sl.args) > 1 else 0, len(shape(cache)))
    if sl.target in NARROW_OPS:
        start, end = sl.args[2], None
    else:
        start, end = arg(sl, 2, "start"), arg(sl, 3, "end")
        if arg(sl, 4, "step", 1) != 1 or start is None or end is None:
            raise NotRecognized("copy_ into a slice with a step or without bounds")
    value = node.args[1]
    if not shapes_equal(shape(value), shape(sl)):
        raise NotRecognized("copy_ source broadcast into the slice")
    return CacheWrite(node, "copy_slice", cache, dim, value, None, start, end, shape(sl)[dim], (sl,), True)


def find_cache_write(ep: ExportedProgram, buffer: str) -> CacheWrite:
    """The one write of buffer ``buffer`` in a functional program (raises NotRecognized).

    The write must be the node written back to the buffer (its ``BUFFER_MUTATION`` output) and
    the buffer's only reader apart from the nodes that build it (``aux``).
    """
    buffers = buffer_placeholders(ep)
    if buffer not in buffers:
        raise NotRecognized("buffer not in program")
    placeholder = buffers[buffer]
    written = mutated_buffers(ep).get(buffer)
    if written is None:
        raise NotRecognized("cache is never written")
    nodes = [u for u in placeholder.users if u.name == written]
    if not nodes:
        raise NotRecognized("cache written back from something that does not read it")
    write = cache_write(nodes[0])
    if write.cache is not placeholder:
        raise NotRecognized("cache write does not read the cache")
    extra = set(placeholder.users) - {write.node, *write.aux}
    if extra:
        raise NotRecognized("cache has readers other than its one write")
    return write


__all__ = [
    "AttentionSite", "CACHE_WRITES", "COPY_LIKE", "CacheWrite", "EXPAND_OPS", "INDEX_COPY", "INDEX_PUT",
    "KVSource", "NARROW_OPS", "NotRecognized", "REPEAT_KV", "REPEAT_OPS", "SDPAArgs", "SDPA_OPS", "SLICE_OPS",
    "SLICE_SCATTER", "VIEW_OPS", "attention_site", "attention_sites", "cache_write", "find_cache_write", "is_sdpa",
    "peel_kv", "sdpa_args", "set_sdpa_arg",
]
