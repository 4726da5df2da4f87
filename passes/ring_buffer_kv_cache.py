"""RingBufferKVCache: full-length KV caches of sliding-window layers become ring buffers.

A sliding-window layer with window W only ever attends to the last W positions, yet the
eager model (and most foreign exports) keep a cache of the full context length S for it.
This pass shrinks such a cache to R slots (default ``2 * W``) and rewrites its write and its
readers so that the program computes the same logits.

Matches, per cache buffer that has a window (from ``windows=`` or the model config):
  * the buffer's only reader is ``aten.index_copy(cache, 2, pos, new)`` whose result is
    written back to the buffer (functional IR of ``cache.index_copy_(2, input_pos, new)``);
  * every other reader of that result is ``aten.scaled_dot_product_attention`` as ``key`` or
    ``value`` (rank 4, sequence at dim 2), directly or through the repeat_kv chain
    ``unsqueeze -> expand -> clone -> view/_unsafe_view/reshape`` (``_to_copy``/``alias``
    allowed), with an explicit ``attn_mask`` whose last dim is S and ``is_causal=False``;
  * every SDPA it feeds reads only caches that are rewritten too, written at the same ``pos``
    and with the same R (so key and value lengths stay equal).

Produces:
  * the buffer resized to R along dim 2 (same name, dtype, device: prefill and decode keep
    sharing one cache), written at ``pos % R``;
  * the size arguments of the repeat_kv chain changed from S to R;
  * for each SDPA, a new mask: the ORIGINAL mask ``(..., L, S)`` gathered along its last dim
    at the absolute position held by each slot, AND-ed with "slot written" (``-inf`` for
    additive float masks). With contiguous writes and last written position ``p = pos[-1]``,
    slot ``j`` holds position ``k_pos[j] = p - ((p - j) mod R)``; ``k_pos < 0`` means the
    slot was never written. One gathered mask is shared per (mask node, pos node, R).
    Whatever the original mask encoded (causal, window, padding) is kept exactly.

Leaves alone (counted in ``stats.skipped`` with the reason): buffers without a window
(global layers), caches with other readers or writes, writes not on dim 2, SDPA without a
mask or with ``is_causal``, caches already of size <= R (so the pass is idempotent).

Rejects (PassError): a prefill chunk L > R - W + 1 -- the write of such a chunk overwrites
slots that its own first queries still need. L is the static length of ``pos`` or the upper
bound of its symbol in ``ep.range_constraints``.

Stats: ``matched`` = windowed buffers present in the program, ``rewritten`` = buffers ringed,
``skipped[reason]``, and one ``sites`` entry per buffer (window, ring_size, bytes_before,
bytes_after; or the skip reason).

Invariant: for contiguous positions starting at 0 (chunked prefill then decode, chunks
<= R - W + 1) and a mask that never lets a query see keys older than W positions, the
logits equal the full-cache program's up to float summation order (softmax over R slots
instead of S positions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats
from fxport.passes.graph import buffer_placeholders, call, mutated_buffers, resize_buffer, tensor_of

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SAME_SHAPE = (aten.clone.default, aten._to_copy.default, aten.alias.default)


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


def max_length(ep: ExportedProgram, size: int | torch.SymInt) -> int | float:
    """Static value of ``size``, or the upper bound of its symbol in ``ep.range_constraints``."""
    if isinstance(size, int):
        return size
    from torch.utils._sympy.value_ranges import bound_sympy

    upper = bound_sympy(size.node.expr, dict(ep.range_constraints)).upper
    return int(upper) if upper.is_finite else float("inf")


class _Skip(Exception):
    """A site the pass cannot prove; the message is the skip reason."""


class RingBufferKVCache(Pass):
    """Sliding-window caches become ring buffers of size R (see the module docstring).

    windows: ``{buffer FQN: window}``; for foreign graphs. Defaults to
        :func:`windows_from_config` of ``config``.
    ring_size: R for every buffer, or ``{buffer FQN: R}``; default ``2 * window``.
    """

    def __init__(
        self,
        windows: Mapping[str, int] | None = None,
        ring_size: int | Mapping[str, int] | None = None,
        config: Any = None,
    ):
        if windows is None:
            if config is None:
                raise ValueError("RingBufferKVCache: pass windows={buffer FQN: window} or config=")
            windows = windows_from_config(config)
        self.windows = {k: int(w) for k, w in windows.items()}
        for name, w in self.windows.items():
            if w < 1:
                raise ValueError(f"RingBufferKVCache: window {w} of buffer {name} must be >= 1")
        self.ring_size = ring_size
        for name in self.windows:
            r, w = self._ring(name), self.windows[name]
            if r < w:
                raise ValueError(f"RingBufferKVCache: ring_size {r} < window {w} for buffer {name}")

    def _ring(self, name: str) -> int:
        if self.ring_size is None:
            return 2 * self.windows[name]
        if isinstance(self.ring_size, int):
            return self.ring_size
        return int(self.ring_size.get(name, 2 * self.windows[name]))

    def __repr__(self) -> str:
        return f"RingBufferKVCache(windows={len(self.windows)} buffers, ring_size={self.ring_size})"

    # ------------------------------------------------------------------------ matching

    def _match(self, ep: ExportedProgram, name: str, buf: Node, writes: dict[str, str]) -> dict:
        """Check one cache; returns its site (write node, chains, SDPA readers) or raises _Skip."""
        r = self._ring(name)
        val = buf.meta["val"]
        if val.dim() != 4:
            raise _Skip("cache is not rank 4 (B, H, S, D)")
        s = val.shape[2]
        if not isinstance(s, int):
            raise _Skip("symbolic cache length")
        users = list(buf.users)
        if len(users) != 1 or users[0].target != aten.index_copy.default:
            raise _Skip("cache has readers other than one index_copy write")
        write = users[0]
        cache, dim, pos, _new = write.args
        if cache is not buf or dim not in (2, -2):
            raise _Skip("index_copy not on dim 2 of the cache")
        if writes.get(name) != write.name:
            raise _Skip("index_copy result is not the buffer's write-back")
        if s <= r:
            raise _Skip("cache length <= ring size (already a ring, or nothing to save)")
        if pos.meta["val"].dim() != 1:
            raise _Skip("index_copy index is not 1-D")
        chains: list[tuple[Node, int]] = []  # (expand/view node, index of S in its sizes)
        readers: list[tuple[Node, int]] = []  # (sdpa, arg index)
        # Walk the readers: (node, seq dim of node's value).
        stack = [(write, 2)]
        while stack:
            node, seq = stack.pop()
            for user in node.users:
                if user.op == "output":
                    if node is not write:
                        raise _Skip("cache view is a program output")
                    continue
                if user.target == _SDPA:
                    idx = [i for i, a in enumerate(user.args[:3]) if a is node]
                    if idx != [1] and idx != [2]:
                        raise _Skip("cache used by SDPA as query (or twice)")
                    if node.meta["val"].dim() != 4 or seq != 2:
                        raise _Skip("SDPA reads the cache with the sequence not at dim 2")
                    readers.append((user, idx[0]))
                    continue
                if user.args[0] is not node:
                    raise _Skip(f"cache read by {user.target} in a non-input position")
                out_seq = self._seq_dim(user, seq, s)
                stack.append((user, out_seq))
                if user.target == aten.expand.default or user.target in _VIEWS:
                    if user.args[1][out_seq] not in (s, -1):
                        raise _Skip(f"{user.target} of the cache with a computed sequence size")
                    chains.append((user, out_seq))
        if not readers:
            raise _Skip("cache not read by any SDPA")
        for sdpa, _ in readers:
            mask = _sdpa_arg(sdpa, 3, "attn_mask")
            if not isinstance(mask, Node):
                raise _Skip("SDPA without attn_mask")
            if _sdpa_arg(sdpa, 5, "is_causal", False):
                raise _Skip("SDPA with is_causal")
            if mask.meta["val"].shape[-1] != s:
                raise _Skip("SDPA mask last dim is not the cache length")
            if mask.meta["val"].dtype not in (torch.bool, sdpa.args[0].meta["val"].dtype):
                raise _Skip("SDPA float mask dtype differs from the query's")
        return {"name": name, "buf": buf, "write": write, "pos": pos, "ring": r, "s": s,
                "chains": chains, "readers": readers}

    @staticmethod
    def _seq_dim(user: Node, seq: int, s: int) -> int:
        """Sequence dim of ``user``'s output given the one of its input (or raise _Skip)."""
        if user.target == aten.unsqueeze.default:
            rank = user.meta["val"].dim()
            d = user.args[1] % rank
            return seq + 1 if d <= seq else seq
        if user.target == aten.expand.default:
            return seq + len(user.args[1]) - user.args[0].meta["val"].dim()
        if user.target in _SAME_SHAPE:
            return seq
        if user.target in _VIEWS:
            src = user.args[0].meta["val"].shape
            out = user.meta["val"].shape
            if not all(isinstance(d, int) for d in (*src, *out)):
                raise _Skip("symbolic shape in the cache's repeat_kv chain")
            prefix = _prod(src[:seq])
            for k in range(len(out)):
                if _prod(out[:k]) == prefix and out[k] == s:
                    return k
            raise _Skip("view of the cache that merges or splits the sequence dim")
        raise _Skip(f"cache read by {user.target}")

    # ------------------------------------------------------------------------ rewriting

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        buffers = buffer_placeholders(ep)
        writes = mutated_buffers(ep)
        sites: dict[str, dict] = {}
        for name in self.windows:
            if name not in buffers:
                stats.skip("buffer not in program")
                continue
            stats.matched += 1
            try:
                sites[name] = self._match(ep, name, buffers[name], writes)
            except _Skip as e:
                stats.skip(str(e))
                stats.sites.append({"buffer": name, "window": self.windows[name], "skipped": str(e)})

        # An SDPA must read only rewritten caches, written at one pos with one R.
        changed = True
        while changed:
            changed = False
            by_sdpa: dict[Node, dict[int, str]] = {}
            for name, site in sites.items():
                for sdpa, arg in site["readers"]:
                    by_sdpa.setdefault(sdpa, {})[arg] = name
            for sdpa, args in by_sdpa.items():
                names = set(args.values())
                keys = {(sites[n]["pos"], sites[n]["ring"]) for n in names}
                if set(args) == {1, 2} and len(keys) == 1:
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
            r, w = site["ring"], self.windows[name]
            chunk = max_length(ep, site["pos"].meta["val"].shape[0])
            if chunk > r - w + 1:
                chunk = "unbounded" if chunk == float("inf") else chunk
                raise PassError(
                    f"RingBufferKVCache: chunk {chunk} exceeds ring size {r} - window {w} + 1 for "
                    f"buffer {name}; export with a smaller max chunk or pass ring_size="
                )

        graph = ep.graph
        slot_pos: dict[tuple[Node, int], tuple[Node, Node, Node]] = {}
        masks: dict[tuple[Node, Node, int], Node] = {}
        done: set[Node] = set()
        for name, site in sites.items():
            buf, write, pos, r, s = site["buf"], site["write"], site["pos"], site["ring"], site["s"]
            old = tensor_of(ep, buf)
            shape = list(old.shape)
            shape[2] = r
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            resize_buffer(ep, name, new)
            if (pos, r) not in slot_pos:
                slot_pos[(pos, r)] = self._slot_positions(graph, pos, r)
            wrapped, idx, valid = slot_pos[(pos, r)]
            write.update_arg(2, wrapped)
            for node, k in site["chains"]:
                if node.args[1][k] == s:
                    node.update_arg(1, [*node.args[1][:k], r, *node.args[1][k + 1:]])
            for sdpa, _ in site["readers"]:
                if sdpa in done:  # its value (or key) cache was handled first
                    continue
                done.add(sdpa)
                mask = _sdpa_arg(sdpa, 3, "attn_mask")
                if (mask, pos, r) not in masks:
                    masks[(mask, pos, r)] = self._gather_mask(graph, mask, idx, valid)
                _set_sdpa_arg(sdpa, 3, "attn_mask", masks[(mask, pos, r)])
            stats.rewritten += 1
            before = old.numel() * old.element_size()
            stats.sites.append({"buffer": name, "window": self.windows[name], "ring_size": r,
                                "bytes_before": before, "bytes_after": before // s * r})
        return PassResult(ep, bool(sites), stats)

    @staticmethod
    def _slot_positions(graph: torch.fx.Graph, pos: Node, r: int) -> tuple[Node, Node, Node]:
        """Nodes for ``pos % R``, the gather index ``clamp(k_pos, 0)`` and ``k_pos >= 0``."""
        device = pos.meta["val"].device
        with graph.inserting_before(_after(pos)):
            wrapped = call(graph, aten.remainder.Scalar, pos, r)
            last = call(graph, aten.select.int, pos, 0, -1)  # () last written position p
            slots = call(graph, aten.arange.default, r, dtype=torch.int64, device=device)  # (R,)
            back = call(graph, aten.remainder.Scalar, call(graph, aten.sub.Tensor, last, slots), r)
            k_pos = call(graph, aten.sub.Tensor, last, back)  # (R,) absolute position held by slot j
            idx = call(graph, aten.clamp.default, k_pos, 0)
            valid = call(graph, aten.ge.Scalar, k_pos, 0)
        return wrapped, idx, valid

    @staticmethod
    def _gather_mask(graph: torch.fx.Graph, mask: Node, idx: Node, valid: Node) -> Node:
        """``mask[..., clamp(k_pos, 0)]`` and-ed with ``k_pos >= 0``: (..., L, R)."""
        m = mask.meta["val"]
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max((mask, valid), key=order.__getitem__)
        with graph.inserting_before(_after(anchor)):
            gathered = call(graph, aten.index_select.default, mask, m.dim() - 1, idx)  # (..., L, R)
            if m.dtype == torch.bool:
                return call(graph, aten.logical_and.default, gathered, valid)
            return call(graph, aten.where.ScalarOther, valid, gathered, float("-inf"))


def _after(node: Node) -> Node:
    """The node before which new nodes computed from ``node`` go (after all placeholders)."""
    if node.op == "placeholder":
        node = [n for n in node.graph.nodes if n.op == "placeholder"][-1]
    return node.next


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _sdpa_arg(sdpa: Node, index: int, name: str, default=None):
    if len(sdpa.args) > index:
        return sdpa.args[index]
    return sdpa.kwargs.get(name, default)


def _set_sdpa_arg(sdpa: Node, index: int, name: str, value) -> None:
    if len(sdpa.args) > index:
        sdpa.update_arg(index, value)
    else:
        sdpa.update_kwarg(name, value)
