"""FixedSlotFusion: the multimodal ``masked_scatter`` merge becomes an export-friendly fusion.

Matches:
    ``masked_scatter(embeds, mask, feats)`` where ``embeds`` is (..., H) with a static H and
    ``mask`` is a token mask broadcast over the hidden dim: ``tokens == placeholder_id``
    (``aten.eq.Scalar``, shape ``embeds.shape[:-1]``), followed by any of unsqueeze(-1) /
    view/reshape to (..., 1) / expand to ``embeds.shape`` / clone / alias / bool ``_to_copy``.
    Also the data-dependent checks exported around it (transformers' ``torch_compilable_check``
    of the placeholder count: ``sum`` / ``index`` with a bool mask / ``nonzero`` / ``item`` /
    ``_is_all_true`` / ``sym_*`` arithmetic / ``_assert_scalar`` / ``sym_constrain_range*``):
    every assert that is not downstream of the merge and whose inputs derive from the
    placeholder mask is removed, with the unbacked-size computation that fed it.
Produces:
    * mode="dynamic" (exact): ``where(mask[..., None], feats2d[clamp(cumsum(mask.flatten()) - 1,
      0)].view_as(embeds), embeds)`` with ``feats2d = feats.reshape(-1, H)``; when the feature
      count may be 0, a zero row is prepended instead of the ``- 1`` (never an empty gather).
      Equal to ``masked_scatter`` for every mask that masked_scatter accepts (placeholder count
      <= feature rows; extra rows are ignored by both).
    * mode="static": features go to fixed ``(start, length)`` slots along the sequence dim (the
      same slots for every batch row; rows are consumed batch-major like masked_scatter):
      ``cat([embeds[:, :s0], feats[:, 0:n0], embeds[:, s0+n0:s1], ...], dim=-2)``; zero-length
      pieces are left out, so no zero-length slice is ever emitted. With a symbolic sequence
      length (min >= the last slot end) the slots are written with ``slice_scatter`` instead
      (a symbolic tail slice would make export guard on its length). Equal to masked_scatter
      when the placeholders sit exactly in the slots.
    * Placeholder ids are replaced by ``pad_token_id`` before every ``aten.embedding`` that
      reads the raw token tensor: ``embedding(w, where(tokens == id, pad, tokens))``, so no
      (possibly out-of-vocabulary) placeholder id is embedded. The merge overwrites those rows,
      so the merged embeddings are unchanged.
Leaves alone (counted in ``stats.skipped`` with the reason):
    masks that are not ``tokens == constant`` broadcast over the hidden dim (e.g. transformers'
    ``inputs_embeds == embed(id)).all(-1)`` path), other placeholder ids than
    ``placeholder_token_id``, a symbolic hidden size, and merges whose mask-derived
    data-dependent values feed anything but the checks (then nothing of that merge is touched).
    Embeddings that do not read the raw tokens (already replaced upstream) are not wrapped.
    A graph without any masked_scatter (decode, text decoders fed ids or embeddings) is
    reported as skipped "no masked_scatter in the graph".
Invariant:
    dynamic: outputs bit-identical to the unrewritten program (torch.equal) for every input
    masked_scatter accepts; static: identical when placeholders occupy exactly the slots.
    (If a padded embedding also feeds something besides the merge, that use sees the pad
    embedding at placeholder rows, as transformers' Gemma 4 per-layer inputs do.)
    No ``masked_scatter`` / ``nonzero`` / ``item`` / ``_assert_scalar`` from the merge remains.
    Idempotent: the fused graph has no masked_scatter left, so a second run reports no change.
Errors (:class:`PassError`):
    static slots whose rows (batch x sum of lengths) differ from the static feature rows, a
    symbolic feature count in static mode, slots that do not fit every sequence length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats
from fxport.passes.graph import bounds, call, copy_meta, meta_val, shape, shapes_equal, val
from fxport.passes.match import Any, Const, P, ancestors, descendants, find_all, is_op

aten = torch.ops.aten

Slots = Sequence[tuple[int, int]]

# Ops allowed between ``tokens == id`` and the masked_scatter mask (shape-checked below).
_MASK_WRAPPERS = (aten.unsqueeze, aten.expand, aten.view, aten.reshape, aten.clone, aten.alias, aten._to_copy)
# Runtime checks and constraints (they have side effects, so DCE keeps them).
_CHECKS = (
    aten._assert_scalar,
    aten._assert_async,
    aten._functional_assert_scalar,
    aten._functional_assert_async,
    aten.sym_constrain_range,
    aten.sym_constrain_range_for_size,
    aten._functional_sym_constrain_range,
    aten._functional_sym_constrain_range_for_size,
)

MERGE = P(aten.masked_scatter, Any("embeds"), Any("mask"), Any("feats"))
TOKEN_MASK = P(aten.eq.Scalar, Any("tokens"), Const(name="token_id"))


def _unbacked(node: Node) -> bool:
    v = meta_val(node)
    try:
        return bool(free_unbacked_symbols(v)) if v is not None else False
    except Exception:  # exotic vals (tuples of non-tensors): not a data-dependent source
        return False


class FixedSlotFusion(Pass):
    """See the module docstring for the contract (match / produce / leave alone / invariant).

    Args:
        mode: "dynamic" (exact cumsum gather, any placeholder layout) or "static" (fixed slots).
        slots: static mode only: ``[(start, length), ...]`` along the sequence dim, sorted,
            non-overlapping, length >= 1; or ``{placeholder_id: [(start, length), ...]}`` when
            a graph has several merges.
        placeholder_token_id: the id (or ids) whose merges to rewrite; None = any
            ``tokens == constant`` mask (the id is read from the graph).
        pad_token_id: the id embedded instead of a placeholder.
    """

    def __init__(
        self,
        mode: str = "dynamic",
        slots: Union[Slots, Mapping[int, Slots], None] = None,
        placeholder_token_id: Union[int, Sequence[int], None] = None,
        pad_token_id: int = 0,
    ):
        if mode not in ("dynamic", "static"):
            raise ValueError(f"FixedSlotFusion: mode={mode!r}; use 'dynamic' or 'static'")
        if mode == "static" and not slots:
            raise ValueError("FixedSlotFusion: mode='static' needs slots=[(start, length), ...]")
        if mode == "dynamic" and slots:
            raise ValueError("FixedSlotFusion: slots= only applies to mode='static'")
        self.mode = mode
        if isinstance(slots, Mapping):
            self.slots = {int(k): _check_slots(v) for k, v in slots.items()}
        else:
            self.slots = _check_slots(slots) if slots else None
        if placeholder_token_id is None or isinstance(placeholder_token_id, int):
            self.ids = None if placeholder_token_id is None else {placeholder_token_id}
        else:
            self.ids = set(placeholder_token_id)
        self.pad_token_id = int(pad_token_id)

    def __repr__(self) -> str:
        return (
            f"FixedSlotFusion(mode={self.mode!r}, slots={self.slots}, "
            f"placeholder_token_id={self.ids}, pad_token_id={self.pad_token_id})"
        )

    # ------------------------------------------------------------------ matching

    def _match(self, caps: dict, stats: PassStats) -> dict | None:
        """Completed captures of a rewritable merge, or None (with a skip reason recorded)."""
        e_shape = shape(caps["embeds"])
        if e_shape is None or len(e_shape) < 2:
            stats.skip("embeds is not a (..., H) tensor")
            return None
        if not isinstance(e_shape[-1], int):
            stats.skip("hidden size is symbolic")
            return None
        tok_shape = e_shape[:-1]
        m = caps["mask"]
        while not TOKEN_MASK.match(m, caps):
            if not (is_op(m, _MASK_WRAPPERS) and _wrapper_ok(m, tok_shape, e_shape)):
                stats.skip("mask is not tokens == constant broadcast over the hidden dim")
                return None
            m = m.args[0]
        tokens = val(caps["tokens"])
        integer_ids = isinstance(tokens, torch.Tensor) and not tokens.dtype.is_floating_point and tokens.dtype != torch.bool
        if not shapes_equal(shape(m), tok_shape) or not isinstance(caps["token_id"], int) or not integer_ids:
            stats.skip("mask is not tokens == constant broadcast over the hidden dim")
            return None
        if self.ids is not None and caps["token_id"] not in self.ids:
            stats.skip(f"placeholder id {caps['token_id']} not in placeholder_token_id")
            return None
        caps["eq"], caps["shape"] = m, e_shape  # the shape: embeds may be rewritten before use
        return caps

    # ------------------------------------------------------------------ pass

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        graph = ep.graph
        stats = PassStats()
        merges: list[tuple[Node, dict]] = []
        candidates = list(find_all(graph, MERGE))
        if not candidates:  # e.g. a decode program, or a text decoder fed embeddings
            stats.skip("no masked_scatter in the graph")
        for node, caps in candidates:
            if self._match(caps, stats) is not None:
                stats.matched += 1
                merges.append((node, caps))
        if not merges:
            return PassResult(ep, False, stats)
        if self.mode == "static" and isinstance(self.slots, Mapping):
            missing = [c["token_id"] for _, c in merges if c["token_id"] not in self.slots]
            if missing:
                raise PassError(f"FixedSlotFusion: no slots for placeholder id(s) {missing}; add them to slots=")
        elif self.mode == "static" and len(merges) > 1:
            ids = [c["token_id"] for _, c in merges]
            raise PassError(
                f"FixedSlotFusion: {len(merges)} merges (placeholder ids {ids}) share one slot list; "
                "pass slots={placeholder_id: [(start, length), ...]}"
            )

        checks = _merge_checks(graph, merges)  # merge node -> its checks
        rewritable, blocked = [], []
        for node, caps in merges:
            blocker = _live_data_dependent(graph, caps, merges, checks[node])
            if blocker is not None:
                stats.skip(f"data-dependent value {blocker} derived from the mask is used outside the checks")
                blocked.append(node)
            else:
                rewritable.append((node, caps))
        if not rewritable:
            return PassResult(ep, False, stats)

        ids_by_tokens: dict[Node, list[int]] = {}
        for node, caps in rewritable:
            caps["embeds"], caps["feats"] = node.args[0], node.args[2]  # refresh after earlier rewrites
            before = set(graph.nodes)
            with graph.inserting_before(node):
                new = self._dynamic(graph, ep, caps) if self.mode == "dynamic" else self._static(graph, ep, caps)
            node.replace_all_uses_with(new)
            for n in graph.nodes:  # new nodes point at the merge's source line in dumps
                if n not in before:
                    copy_meta(node, n, ("stack_trace",))
            graph.erase_node(node)
            ids_by_tokens.setdefault(caps["tokens"], []).append(caps["token_id"])
            stats.rewritten += 1
            stats.sites.append(
                {
                    "merge": node.name,
                    "placeholder_id": caps["token_id"],
                    "mode": self.mode,
                    "feature_rows": str(caps["rows"]),
                    "checks_removed": len(checks[node]),
                }
            )
        padded = {t: self._replace_placeholders(graph, t, ids) for t, ids in ids_by_tokens.items()}
        for site, (_, caps) in zip(stats.sites, rewritable):
            site["embeddings_padded"] = padded[caps["tokens"]]
        keep = {c for b in blocked for c in checks[b]}
        doomed = {c for n, _ in rewritable for c in checks[n]} - keep
        for c in reversed(list(graph.nodes)):  # reverse order: functional asserts chain tokens
            if c in doomed and not c.users:
                graph.erase_node(c)
        graph.eliminate_dead_code()
        return PassResult(ep, True, stats)

    # ------------------------------------------------------------------ rewrites

    def _dynamic(self, graph, ep: ExportedProgram, caps: dict) -> Node:
        embeds, feats, eq = caps["embeds"], caps["feats"], caps["eq"]
        H = caps["shape"][-1]
        rows = _rows(feats, H)
        caps["rows"] = rows
        flat = call(graph, aten.view.default, eq, [-1])  # (T,) bool, T = B * L
        count = call(graph, aten.cumsum.default, flat, 0)  # (T,) int64: k-th placeholder -> k
        feats2d = feats if _is_2d(feats, H) else call(graph, aten.reshape.default, feats, [-1, H])  # (N, H)
        if bounds(ep, rows)[0] >= 1:
            index = call(graph, aten.clamp.default, call(graph, aten.sub.Tensor, count, 1), 0)  # (T,)
            table = feats2d
        else:  # the feature count may be 0: gather from [zero row; feats] with index = count
            zero = call(graph, aten.new_zeros.default, feats2d, [1, H])
            table = call(graph, aten.cat.default, [zero, feats2d], 0)  # (N + 1, H)
            index = count
        gathered = call(graph, aten.index_select.default, table, 0, index)  # (T, H)
        gathered = call(graph, aten.view_as.default, gathered, embeds)  # (..., H)
        cond = call(graph, aten.unsqueeze.default, eq, -1)  # (..., 1)
        return call(graph, aten.where.self, cond, gathered, embeds)

    def _static(self, graph, ep: ExportedProgram, caps: dict) -> Node:
        embeds, feats = caps["embeds"], caps["feats"]
        slots = self.slots[caps["token_id"]] if isinstance(self.slots, Mapping) else self.slots
        e_shape = caps["shape"]
        H, dim = e_shape[-1], len(e_shape) - 2
        batch = e_shape[:-2]
        if not all(isinstance(b, int) for b in batch):
            raise PassError(f"FixedSlotFusion: static mode needs static batch dims, {embeds.name} has {batch}")
        n_batch = 1
        for b in batch:
            n_batch *= b
        rows = _rows(feats, H)
        caps["rows"] = rows
        total = sum(n for _, n in slots)
        if not isinstance(rows, int):
            raise PassError(
                f"FixedSlotFusion: static mode needs a static feature count; {feats.name} has {rows} rows. "
                "Export with a fixed number of feature rows or use mode='dynamic'."
            )
        if rows != n_batch * total:
            raise PassError(
                f"FixedSlotFusion: slots {list(slots)} hold {total} rows per sequence x batch {n_batch} = "
                f"{n_batch * total}, but features {feats.name} have {rows} rows of size {H}; "
                "fix slots= or the feature count."
            )
        end = slots[-1][0] + slots[-1][1]
        L = e_shape[-2]
        lo, hi = bounds(ep, L)
        if end > lo:
            raise PassError(
                f"FixedSlotFusion: slots end at {end} but the sequence length of {embeds.name} is "
                f"{L} (range [{lo}, {hi}]); static slots need a sequence length >= {end} for every input. "
                "Export with a larger minimum length or use mode='dynamic'."
            )
        feats3 = call(graph, aten.reshape.default, feats, [*batch, total, H])  # (*batch, total, H)
        parts, offset = [], 0  # (start, length, feature rows) per slot
        for start, n in slots:
            rows_node = feats3 if n == total else call(graph, aten.slice.Tensor, feats3, dim, offset, offset + n)
            parts.append((start, n, rows_node))
            offset += n
        if not isinstance(L, int):
            # Slicing a symbolic tail (L - end) makes export guard on its size; write the slots
            # into the embeddings instead: every slice_scatter source has its static length n.
            out = embeds
            for start, n, rows_node in parts:
                out = call(graph, aten.slice_scatter.default, out, rows_node, dim, start, start + n)
            return out
        pieces, cursor = [], 0
        for start, n, rows_node in parts:
            if start > cursor:
                pieces.append(call(graph, aten.slice.Tensor, embeds, dim, cursor, start))
            pieces.append(rows_node)
            cursor = start + n
        if L > cursor:
            pieces.append(call(graph, aten.slice.Tensor, embeds, dim, cursor, L))
        return pieces[0] if len(pieces) == 1 else call(graph, aten.cat.default, pieces, dim)

    def _replace_placeholders(self, graph, tokens: Node, ids: list[int]) -> int:
        """``embedding(w, tokens)`` of the raw tokens -> ``embedding(w, where(tokens == id, pad, ...))``."""
        n = 0
        for user in list(tokens.users):
            if not (is_op(user, aten.embedding) and len(user.args) > 1 and user.args[1] is tokens):
                continue
            padded = tokens
            with graph.inserting_before(user):
                for token_id in ids:
                    is_placeholder = call(graph, aten.eq.Scalar, tokens, token_id)
                    padded = call(graph, aten.where.ScalarSelf, is_placeholder, self.pad_token_id, padded)
            user.replace_input_with(tokens, padded)
            n += 1
        return n


# ----------------------------------------------------------------------------- helpers


def _check_slots(slots) -> list[tuple[int, int]]:
    out = [(int(s), int(n)) for s, n in slots]
    cursor = 0
    for s, n in out:
        if n < 1 or s < cursor:
            raise ValueError(
                f"FixedSlotFusion: slots {out} must be sorted, non-overlapping (start, length) pairs "
                "with start >= 0 and length >= 1"
            )
        cursor = s + n
    return out


def _wrapper_ok(node: Node, tok_shape: tuple, e_shape: tuple) -> bool:
    """One op between ``tokens == id`` and the mask keeps 'one flag per token row'."""
    src, out = shape(node.args[0]), shape(node)
    if is_op(node, aten.unsqueeze):
        return shapes_equal(src, tok_shape) and node.args[1] in (-1, len(tok_shape))
    if is_op(node, aten.view, aten.reshape):
        return shapes_equal(src, tok_shape) and shapes_equal(out, (*tok_shape, 1))
    if is_op(node, aten.expand):
        return shapes_equal(out, e_shape) and (shapes_equal(src, (*tok_shape, 1)) or shapes_equal(src, e_shape))
    if is_op(node, aten._to_copy):
        return val(node).dtype == torch.bool and shapes_equal(src, out)
    return shapes_equal(src, out)  # clone / alias


def _is_2d(feats: Node, H: int) -> bool:
    s = shape(feats)
    return s is not None and len(s) == 2 and s[1] == H


def _rows(feats: Node, H: int):
    """Number of H-sized rows in ``feats`` (int or SymInt)."""
    s = shape(feats)
    if s is None or s[-1] != H:
        raise PassError(
            f"FixedSlotFusion: features {getattr(feats, 'name', feats)} have shape {s}; expected (..., {H})"
        )
    n = 1
    for d in s[:-1]:
        n = n * d
    return n


def _merge_checks(graph, merges) -> dict[Node, list[Node]]:
    """Per merge: the asserts upstream of all merges whose inputs derive from its placeholder mask."""
    merge_nodes = {n for n, _ in merges}
    downstream = descendants(merge_nodes)
    out: dict[Node, list[Node]] = {n: [] for n in merge_nodes}
    for node in graph.nodes:
        if not is_op(node, _CHECKS) or node in downstream:
            continue
        masks = set()
        for anc in ancestors([node], stop=merge_nodes):
            caps = {}
            if TOKEN_MASK.match(anc, caps):
                masks.add((caps["tokens"], caps["token_id"]))
        for merge, caps in merges:
            if (caps["tokens"], caps["token_id"]) in masks:
                out[merge].append(node)
    return out


def _live_data_dependent(graph, caps: dict, merges, checks: list[Node]) -> str | None:
    """Name of a mask-derived unbacked value that its checks use and that stays needed.

    Such a value (e.g. ``item(sum(mask))`` sizing a slice of the features) would keep the
    data-dependent chain alive after the merge is gone, so the merge is left alone.
    """
    removable = {n for n, _ in merges} | set(checks)
    eq_nodes = [u for u in caps["tokens"].users if TOKEN_MASK.match(u, {}) and u.args[1] == caps["token_id"]]
    sources = descendants(eq_nodes, stop=removable) & ancestors(checks, stop=removable)
    sources = [n for n in graph.nodes if n in sources and _unbacked(n)]
    if not sources:
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    roots = [output, caps["embeds"], caps["feats"], caps["eq"], caps["tokens"]]
    roots += [n for n in graph.nodes if n.op == "call_function" and n.is_impure() and n not in removable]
    live = ancestors(roots, stop=removable) | set(roots)
    for s in sources:
        if s in live:
            return f"{s.name} ({s.target})"
    return None
