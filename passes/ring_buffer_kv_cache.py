"""RingBufferKVCache: full-length KV caches of sliding-window layers become ring buffers.

A sliding-window layer with window W only ever attends to the last W positions, yet the
eager model (and most foreign exports) keep a cache of the full context length S for it.
This pass shrinks such a cache to R slots and rewrites its write and its readers so that the
program computes the same logits. The graph is read through :mod:`fxport.passes.attention`.

Ring size: ``R = max(2 * W, W + C - 1)`` where C is the largest prefill chunk: the
``max_prefill_chunk`` argument, else the largest number of rows the program's cache write
takes (its symbol's upper bound; 1 for decode). An explicit ``ring_size`` is used as given.

One R per buffer, whatever pass object rewrites which method. A pass object keeps the R it
gave each buffer for the next method it rewrites. Across objects, a rewrite of a named method
(``apply(..., method=...)`` / ``PassContext(method=...)``) records its R against the buffer's
tensor (the one object every method exported from one model reads; the ringed tensor too), so
the rewrite of another method -- by a new ``RingBufferKVCache(windows=...)`` as well -- takes
the recorded R when its chunks fit in it, and raises PassError naming both sizes when they do
not (decode ringed to 2W first, then a prefill whose chunks need more) or when an explicit
``ring_size`` differs. Rewrite the method with the largest chunk first, or give every method
the same ``max_prefill_chunk`` / ``ring_size``. Rewriting the same method again is a new trial:
it replaces that method's record.

Matches, per cache buffer that has a window (from ``windows=`` or the model config):
  * the buffer's one write, written back to it (:func:`~fxport.passes.attention.find_cache_write`),
    on dim 2 of a rank-4 (B, H, S, D) cache with a static S, in any of the forms
    ``index_copy(cache, 2, pos, new)`` (HF, ExecuTorch), ``index_put(cache, [None, None, pos],
    new)`` (``cache[:, :, pos] = new``: gpt-fast, torchtune) or ``slice_scatter(cache,
    copy(slice(cache, 2, p, p + L), new), 2, p, p + L)`` (``cache.narrow(2, p, L).copy_(new)``
    with a symbolic start, ExecuTorch's dynamic-shape Llama);
  * every reader of the written cache is an SDPA reading it as ``key`` or ``value``, directly
    or through a K/V chain :func:`~fxport.passes.attention.peel_kv` recognizes
    (``repeat_interleave(n, dim=1)``, repeat_kv ``unsqueeze -> expand -> clone -> view``,
    ``enable_gqa``, copy-like ops), with an explicit ``attn_mask`` whose last dim is S and
    ``is_causal=False``;
  * every SDPA it feeds reads only caches that are rewritten too, written at the same
    positions and with the same R (so key and value lengths stay equal).

Produces:
  * the buffer resized to R along dim 2 (same name, dtype, device: prefill and decode keep
    sharing one cache), written at ``pos % R`` (index forms: the index replaced; the slice
    form becomes ``index_copy(cache, 2, arange(p, p + L) % R, new)``, as a contiguous slice
    cannot wrap around);
  * the size arguments of expand/view nodes in the reader chains changed from S to R;
  * for each SDPA, a new mask: the ORIGINAL mask ``(..., L, S)`` gathered along its last dim
    at the absolute position held by each slot, AND-ed with "slot written" (``-inf`` for
    additive float masks). With contiguous writes and last written position ``p = pos[-1]``,
    slot ``j`` holds position ``k_pos[j] = p - ((p - j) mod R)``; ``k_pos < 0`` means the
    slot was never written. One gathered mask is shared per (mask node, positions, R).
    Whatever the original mask encoded (causal, window, padding) is kept exactly.

Leaves alone (counted in ``stats.skipped`` with the reason): buffers without a window
(global layers), caches with other readers or writes, writes not on dim 2, SDPA without a
mask or with ``is_causal``, caches already of size <= R (so the pass is idempotent).

Rejects (PassError, before any edit): a chunk L > R - W + 1 (the write of such a chunk
overwrites slots that its own first queries still need), and an unbounded chunk; the message
names the buffer, the chunk, the limit and both fixes.

Stats: ``matched`` = windowed buffers present in the program, ``rewritten`` = buffers ringed,
``skipped[reason]``, and one ``sites`` entry per buffer (window, ring_size, chunk, write form,
readers' GQA spelling, bytes_before, bytes_after; or the skip reason).

Invariant: for contiguous positions starting at 0 (chunked prefill then decode, chunks
<= R - W + 1) and a mask that never lets a query see keys older than W positions, the
logits equal the full-cache program's up to float summation order (softmax over R slots
instead of S positions).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.attention import (
    EXPAND_OPS,
    VIEW_OPS,
    AttentionSite,
    CacheWrite,
    NotRecognized,
    attention_sites,
    find_cache_write,
    set_sdpa_arg,
)
from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats
from fxport.passes.graph import buffer_placeholders, call, resize_buffer, tensor_of, upper_bound, val

aten = torch.ops.aten


def windows_from_config(config: Any) -> dict[str, int]:
    """``{model.layers.{i}.self_attn.{k,v}_cache: sliding_window}`` for sliding layers.

    Reads ``config.sliding_window`` and ``config.layer_types`` (or those of
    ``config.text_config`` for multimodal configs).
    """
    if not hasattr(config, "layer_types") and hasattr(config, "text_config"):
        config = config.text_config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or layer_types is None:
        raise ValueError(
            "RingBufferKVCache: config has no sliding_window/layer_types; pass windows={buffer: window}"
        )
    return {
        f"model.layers.{i}.self_attn.{kv}_cache": int(window)
        for i, kind in enumerate(layer_types)
        if kind == "sliding_attention"
        for kv in ("k", "v")
    }


def default_ring_size(window: int, chunk: int) -> int:
    """``max(2 * window, window + chunk - 1)``: the smallest ring that takes chunks of ``chunk``
    rows (``R - W + 1 >= C``), and at least two windows (decode then wraps every W steps)."""
    return max(2 * window, window + chunk - 1)


class _Skip(Exception):
    """A site the pass cannot prove; the message is the skip reason."""


# id(buffer tensor) -> (weak reference to it, {method: {"ring", "chunk", "method"}}): the R each
# cache buffer was given when a named method was rewritten, seen by every pass object (module
# docstring). Rewriting the same method again replaces its entry (a new trial, not a second method).
_RINGS: dict[int, tuple[weakref.ref, dict[str, dict]]] = {}


def recorded_rings(buffer: torch.Tensor) -> dict[str, dict]:
    """``{method: {"ring": R, "chunk": C, "method": method}}`` recorded for a cache buffer."""
    entry = _RINGS.get(id(buffer))
    return entry[1] if entry is not None and entry[0]() is buffer else {}


def _record_ring(buffer: torch.Tensor, info: dict) -> None:
    key = id(buffer)
    if not recorded_rings(buffer):
        _RINGS[key] = (weakref.ref(buffer, lambda _, key=key: _RINGS.pop(key, None)), {})
    _RINGS[key][1][info["method"]] = info


class RingBufferKVCache(Pass):
    """Sliding-window caches become ring buffers of size R (see the module docstring).

    windows: ``{buffer FQN: window}``; for foreign graphs. Defaults to
        :func:`windows_from_config` of ``config``.
    ring_size: R for every buffer, or ``{buffer FQN: R}``; default :func:`default_ring_size`.
    max_prefill_chunk: C for the default R; default: read from the program (the bound of its
        write's length), remembered per buffer for the next method this object rewrites.
    """

    def __init__(
        self,
        windows: Mapping[str, int] | None = None,
        ring_size: int | Mapping[str, int] | None = None,
        config: Any = None,
        max_prefill_chunk: int | None = None,
    ):
        if windows is None:
            if config is None:
                raise ValueError("RingBufferKVCache: pass windows={buffer FQN: window} or config=")
            windows = windows_from_config(config)
        self.windows = {k: int(w) for k, w in windows.items()}
        for name, w in self.windows.items():
            if w < 1:
                raise ValueError(f"RingBufferKVCache: window {w} of buffer {name} must be >= 1")
        if max_prefill_chunk is not None and max_prefill_chunk < 1:
            raise ValueError(f"RingBufferKVCache: max_prefill_chunk must be >= 1; got {max_prefill_chunk}")
        self.ring_size, self.max_prefill_chunk = ring_size, max_prefill_chunk
        self.chosen: dict[str, int] = {}  # buffer -> R chosen from a program (shared by later methods)
        self._chosen: dict[str, dict] = {}  # buffer -> its ring record, for programs that do not share tensors
        for name, w in self.windows.items():
            r = self._explicit(name)
            if r is not None and r < w:
                raise ValueError(f"RingBufferKVCache: ring_size {r} < window {w} for buffer {name}")

    def _explicit(self, name: str) -> int | None:
        if isinstance(self.ring_size, int):
            return self.ring_size
        if isinstance(self.ring_size, Mapping) and name in self.ring_size:
            return int(self.ring_size[name])
        return None

    def _ring(self, name: str, chunk: int | float, earlier: dict | None = None, method: str | None = None) -> int:
        """R for ``name`` given the program's chunk bound and the R recorded for the buffer by an
        earlier rewrite (``earlier``); PassError when unbounded or when the two disagree."""
        w = self.windows[name]
        this = f"method {method!r}" if method else "this program"
        before = None if earlier is None else (
            f"buffer {name} (window {w}) was ringed to {earlier['ring']} slots when "
            + (f"method {earlier['method']!r}" if earlier.get("method") else "an earlier program")
            + f" (chunks up to {earlier['chunk']}) was rewritten")
        explicit = self._explicit(name)
        if explicit is not None:
            if earlier is not None and explicit != earlier["ring"]:
                raise PassError(f"RingBufferKVCache: {before}, but ring_size {explicit} is given for {this}; "
                                f"one buffer has one size in every method: pass ring_size={earlier['ring']}")
            return explicit
        if self.max_prefill_chunk is not None:
            r = default_ring_size(w, self.max_prefill_chunk)
        elif chunk == float("inf"):
            raise PassError(
                f"RingBufferKVCache: the chunk written to buffer {name} has no upper bound, so no ring size "
                f"fits it; export with a bounded chunk (fxport export --max-prefill-chunk N) or pass "
                f"max_prefill_chunk= / ring_size= (--ring-size R)"
            )
        else:
            r = default_ring_size(w, int(chunk))
        if earlier is None:
            return r
        if int(chunk) > earlier["ring"] - w + 1:  # this method's chunks do not fit the recorded ring
            raise PassError(
                f"RingBufferKVCache: {before}, but {this} writes chunks of {chunk}, which need "
                f"{default_ring_size(w, int(chunk))} slots; rewrite the method with the largest chunk first, or "
                f"give every method the same max_prefill_chunk= or ring_size= (--ring-size)")
        return earlier["ring"]

    def __repr__(self) -> str:
        return (f"RingBufferKVCache(windows={len(self.windows)} buffers, ring_size={self.ring_size}, "
                f"max_prefill_chunk={self.max_prefill_chunk})")

    # ------------------------------------------------------------------------ matching

    def _match(self, ep: ExportedProgram, name: str, readers_of: dict[Node, list],
               unrecognized: dict[Node, str], method: str | None = None) -> dict:
        """Check one cache; returns its site (write, chains, SDPA readers) or raises _Skip."""
        try:
            write = find_cache_write(ep, name)
        except NotRecognized as exc:
            raise _Skip(str(exc)) from None
        cval = val(write.cache)
        if cval.dim() != 4 or write.dim != 2:
            raise _Skip("cache write not on dim 2 of a (B, H, S, D) cache")
        s = cval.shape[2]
        if not isinstance(s, int):
            raise _Skip("symbolic cache length")
        chunk = upper_bound(ep, write.length)
        others = {m: i for m, i in recorded_rings(tensor_of(ep, write.cache)).items() if m != method}
        earlier = next(iter(others.values()), None) if method is not None else None
        r = self._ring(name, chunk, earlier or self._chosen.get(name), method)
        if s <= r:
            raise _Skip("cache length <= ring size (already a ring, or nothing to save)")

        # Every reader of the written cache: an SDPA's key/value through a recognized chain.
        reads = readers_of.get(write.node, [])
        allowed = {n for _, _, kv in reads for n in kv.chain}
        sdpas = {site.node: site.args for site, _, _ in reads}
        stack = [write.node]
        while stack:
            node = stack.pop()
            for user in node.users:
                if user.op == "output":
                    if node is not write.node:
                        raise _Skip("cache view is a program output")
                elif user in sdpas:
                    if node is sdpas[user].query or node is sdpas[user].attn_mask:
                        raise _Skip("cache used by SDPA as query or mask")
                    if node is not write.node and node not in allowed:
                        raise _Skip("cache read by SDPA through an unrecognized chain")
                elif user in unrecognized:
                    raise _Skip(f"cache read by an SDPA that is not recognized: {unrecognized[user]}")
                elif user in allowed:
                    stack.append(user)
                elif not reads:
                    raise _Skip(f"cache not read by any SDPA (read by {user.target}; attention spelled as "
                                "matmul/softmax is left alone)")
                else:
                    raise _Skip(f"cache read by {user.target}")
        if not reads:
            raise _Skip("cache not read by any SDPA")
        chains: list[Node] = []
        for site, which, kv in reads:
            if which not in ("key", "value"):
                raise _Skip("cache used by SDPA as query or mask")
            for node in kv.chain:
                if node.target in EXPAND_OPS or node.target in VIEW_OPS:
                    sizes = node.args[1]
                    if sizes[-2] not in (s, -1):
                        raise _Skip(f"{node.target} of the cache with a computed sequence size")
                    chains.append(node)
            a = site.args
            if not isinstance(a.attn_mask, Node):
                raise _Skip("SDPA without attn_mask")
            if a.is_causal:
                raise _Skip("SDPA with is_causal")
            mval = val(a.attn_mask)
            if mval is None or mval.shape[-1] != s:
                raise _Skip("SDPA mask last dim is not the cache length")
            if mval.dtype not in (torch.bool, val(a.query).dtype):
                raise _Skip("SDPA float mask dtype differs from the query's")
        if write.positions is not None:
            key = _value_key(write.positions)
        else:  # K and V may each call pos[0].item(): equal computations are one position source
            key = ("slice", _value_key(write.start), str(write.length))
        return {"name": name, "write": write, "ring": r, "s": s, "chunk": chunk, "pos_key": key,
                "chains": chains, "readers": reads}

    # ------------------------------------------------------------------------ rewriting

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        buffers = buffer_placeholders(ep)
        # source node -> [(site, "key"/"value", KVSource)] for every recognized SDPA
        readers_of: dict[Node, list] = {}
        unrecognized: dict[Node, str] = {}  # SDPA node -> why attention.py does not read it
        for node, site in attention_sites(ep.graph):
            if not isinstance(site, AttentionSite):
                unrecognized[node] = str(site)
            else:
                readers_of.setdefault(site.key.source, []).append((site, "key", site.key))
                readers_of.setdefault(site.value.source, []).append((site, "value", site.value))
        sites: dict[str, dict] = {}
        for name in self.windows:
            if name not in buffers:
                stats.skip("buffer not in program")
                continue
            stats.matched += 1
            try:
                sites[name] = self._match(ep, name, readers_of, unrecognized, ctx.method)
            except _Skip as e:
                stats.skip(str(e))
                stats.sites.append({"buffer": name, "window": self.windows[name], "skipped": str(e)})

        # An SDPA must read only rewritten caches, written at one position source with one R.
        changed = True
        while changed:
            changed = False
            by_sdpa: dict[Node, dict[str, str]] = {}
            for name, site in sites.items():
                for sdpa_site, which, _ in site["readers"]:
                    by_sdpa.setdefault(sdpa_site.node, {})[which] = name
            for sdpa, args in by_sdpa.items():
                names = set(args.values())
                keys = {(sites[n]["pos_key"], sites[n]["ring"]) for n in names}
                if set(args) == {"key", "value"} and len(keys) == 1:
                    continue
                reason = "shares an SDPA with a cache that is not ringed alike"
                for n in names:
                    stats.skip(reason)
                    stats.sites.append({"buffer": n, "window": self.windows[n], "skipped": reason})
                    del sites[n]
                changed = True
                break

        # Chunk check before any edit: a refused program is left exactly as it was.
        for name, site in sites.items():
            r, w, chunk = site["ring"], self.windows[name], site["chunk"]
            if chunk > r - w + 1:
                raise PassError(
                    f"RingBufferKVCache: chunk {chunk} exceeds ring size {r} - window {w} + 1 = {r - w + 1} for "
                    f"buffer {name}; export with chunks <= {r - w + 1} (fxport export --max-prefill-chunk "
                    f"{r - w + 1}) or pass ring_size >= {w + chunk - 1} (--ring-size {w + chunk - 1})"
                )

        graph = ep.graph
        masks: dict[tuple, Node] = {}
        slot_pos: dict[tuple, tuple[Node, Node, Node, Node]] = {}
        done: set[Node] = set()
        for name, site in sites.items():
            write, r, s = site["write"], site["ring"], site["s"]
            old = tensor_of(ep, write.cache)
            shape = list(old.shape)
            shape[2] = r
            ringed = torch.zeros(shape, dtype=old.dtype, device=old.device)
            resize_buffer(ep, name, ringed)
            self.chosen[name] = r
            info = {"ring": r, "chunk": site["chunk"], "method": ctx.method}
            self._chosen.setdefault(name, info)
            if ctx.method is not None:
                for tensor in (old, ringed):  # every method's view of the buffer, before and after
                    _record_ring(tensor, info)
            key = (site["pos_key"], r)
            shared = slot_pos.get(key)
            if shared is None or _order(graph)[shared[0]] > _order(graph)[write.node]:
                shared = slot_pos[key] = _slot_positions(graph, write, r)  # after this write's inputs
            wrapped, idx, valid, _ = shared
            _write_at(write, wrapped)
            for node in site["chains"]:
                sizes = list(node.args[1])
                if sizes[-2] == s:
                    sizes[-2] = r
                    node.update_arg(1, sizes)
            for sdpa_site, _, _ in site["readers"]:
                sdpa = sdpa_site.node
                if sdpa in done:  # its value (or key) cache was handled first
                    continue
                done.add(sdpa)
                mask = sdpa_site.args.attn_mask
                if (mask, key) not in masks:
                    masks[(mask, key)] = _gather_mask(graph, mask, idx, valid)
                set_sdpa_arg(sdpa, "attn_mask", masks[(mask, key)])
            stats.rewritten += 1
            before = old.numel() * old.element_size()
            stats.sites.append({"buffer": name, "window": self.windows[name], "ring_size": r,
                                "chunk": site["chunk"], "write": write.kind,
                                "readers": sorted({kv.spelling for _, _, kv in site["readers"]}),
                                "bytes_before": before, "bytes_after": before // s * r})
        return PassResult(ep, bool(sites), stats)


def _value_key(x: Any) -> Any:
    """A hashable key equal for equal computations: inputs by name, op nodes by (target, args)."""
    if isinstance(x, Node):
        if x.op != "call_function":
            return ("node", x.name)
        return (str(x.target), tuple(_value_key(a) for a in x.args),
                tuple(sorted((k, _value_key(v)) for k, v in x.kwargs.items())))
    if isinstance(x, (list, tuple)):
        return tuple(_value_key(a) for a in x)
    return ("const", repr(x))


def _order(graph: torch.fx.Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _slot_positions(graph: torch.fx.Graph, write: CacheWrite, r: int) -> tuple[Node, Node, Node, Node]:
    """Nodes for the written positions ``pos``, ``pos % R``, the gather index ``clamp(k_pos, 0)``
    and ``k_pos >= 0``; inserted after the last node they depend on."""
    device = val(write.cache).device
    if write.positions is not None:
        deps = [write.positions]
    else:
        deps = [x for x in (write.start, write.end) if isinstance(x, Node)]
    order = _order(graph)
    anchor = max(deps, key=order.__getitem__) if deps else None
    with graph.inserting_before(_after(anchor, graph)):
        if write.positions is not None:
            pos = write.positions
        else:  # (L,) absolute positions of a slice write
            pos = call(graph, aten.arange.start_step, write.start, write.end, 1, dtype=torch.int64, device=device)
        wrapped = call(graph, aten.remainder.Scalar, pos, r)
        last = call(graph, aten.select.int, pos, 0, -1)  # () last written position p
        slots = call(graph, aten.arange.default, r, dtype=torch.int64, device=device)  # (R,)
        back = call(graph, aten.remainder.Scalar, call(graph, aten.sub.Tensor, last, slots), r)
        k_pos = call(graph, aten.sub.Tensor, last, back)  # (R,) absolute position held by slot j
        idx = call(graph, aten.clamp.default, k_pos, 0)
        valid = call(graph, aten.ge.Scalar, k_pos, 0)
    return wrapped, idx, valid, pos


def _write_at(write: CacheWrite, wrapped: Node) -> None:
    """Point the write at slots ``wrapped`` (= positions % R)."""
    node = write.node
    if write.kind == "index_copy":
        node.update_arg(2, wrapped)
    elif write.kind == "index_put":
        indices = list(node.args[1])
        indices[write.dim] = wrapped
        node.update_arg(1, indices)
    else:  # slice_scatter: a contiguous slice cannot wrap; the same rows as index_copy
        node.target = aten.index_copy.default
        node.args, node.kwargs = (write.cache, write.dim, wrapped, write.value), {}


def _gather_mask(graph: torch.fx.Graph, mask: Node, idx: Node, valid: Node) -> Node:
    """``mask[..., clamp(k_pos, 0)]`` and-ed with ``k_pos >= 0``: (..., L, R)."""
    m = val(mask)
    order = _order(graph)
    anchor = max((mask, valid), key=order.__getitem__)
    with graph.inserting_before(_after(anchor, graph)):
        gathered = call(graph, aten.index_select.default, mask, m.dim() - 1, idx)  # (..., L, R)
        if m.dtype == torch.bool:
            return call(graph, aten.logical_and.default, gathered, valid)
        return call(graph, aten.where.ScalarOther, valid, gathered, float("-inf"))


def _after(node: Node | None, graph: torch.fx.Graph) -> Node:
    """The node before which new nodes computed from ``node`` go (after all placeholders)."""
    if node is None or node.op == "placeholder":
        node = [n for n in graph.nodes if n.op == "placeholder"][-1]
    return node.next
