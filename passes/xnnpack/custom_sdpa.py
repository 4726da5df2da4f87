"""CustomSDPA: causal KV-cache attention as ExecuTorch's ``llama::custom_sdpa``.

A static-cache decoder attends over its whole cache every step: SDPA reads all S slots and
masks the unwritten ones away. On the CPU that costs in proportion to S, not to the position:
XNNPACK copies each cache it receives (``Static Reshape``), multiplies the query with all S
keys and takes a softmax over S columns. ExecuTorch ships a kernel that does better, the one its
own Llama export uses: ``llama::custom_sdpa(q, k_cache, v_cache, start_pos, is_causal=True)``
reads keys ``0 .. start_pos + L - 1`` of a (B, S, H_kv, D) cache in place, GQA folded. This pass
moves the attention of fxport's graphs (and anyone's, in the spellings below) onto it.

Matches: an SDPA (read by :func:`fxport.passes.attention.attention_site`) whose key and value
are caches written in this program by their one write
(:func:`~fxport.passes.attention.find_cache_write`): ``index_copy(cache, 2, pos, new)`` or
``index_put(cache, [None, None, pos], new)`` on a buffer of shape (B, H_kv, S, D), S static,
``pos`` a (L,) int64 input of the program (absolute positions: the runner contract's
``input_pos``), key and value written at the same ``pos``, with
  * ``dropout_p == 0``, ``is_causal=False``, a query of the caches' dtype (float32, bfloat16
    or float16: the kernel's);
  * a mask (bool, or additive float with only 0 / -inf) computed from ``pos`` and constants
    alone (a size equal to ``pos``'s length counts as ``pos``'s, whichever input export read
    it from: ``zeros(mask.shape)`` with L taken off the tokens) that never lets query i see a
    slot past ``pos[i]`` and lets it see at least one.
    It is checked by evaluating the mask's subgraph for every start position 0 .. S - 1 at
    L = 1 and, at the largest chunk L, for starts 0, 1, S - L and a stride in between
    (S <= 65536; above, a stride of S / 4096 at L = 1). Exactly causal (row i sees slot s iff
    ``s <= pos[i]``; a sliding window of W >= S is) is the fast case; any other such mask
    (a window shorter than the cache) is the prefix case.
  * every reader of the written caches is an SDPA the pass rewrites (K/V chains: repeat_kv,
    repeat_interleave, enable_gqa, copies), so no other op sees the new layout.
Produces, per cache: the buffer re-laid out as (B, S, H_kv, D) (same name, dtype, device; zero
initial state as before), written with ``index_copy(cache, 1, pos, new.permute(0, 2, 1, 3))``;
per position source: ``start = pos[0].item()`` constrained to [0, S - 1]; per SDPA:
``custom_sdpa(q.permute(0, 2, 1, 3), k_cache, v_cache, start, None, 0.0, True, scale)
.permute(0, 2, 1, 3)`` (scale made explicit), the K/V repetition chains and the mask dropped;
in the prefix case the kernel gets ``k_cache[:, lo:start + L]`` / ``v_cache[:, lo:start + L]``
(copies of the rows a query can see) and those columns of the mask as float (L, start + L - lo)
(``-inf`` where hidden, one per mask node), with ``is_causal=False``, and ``start + L <= S`` is
asserted. ``lo`` is 0, or for a mask whose reach W (every evaluated query at position p sees no
slot below p - W + 1: a sliding window) is shorter than the cache, ``start - min(start, W - 1)``
(that minimum its own scalar in [0, W - 1], so the slices are ``L + min(start, W - 1) <= W + L - 1``
rows, planned at that size): a window reads W + L - 1 rows at most, wherever it is. On the 270M
(window 512, 1,024 positions) the decode step at position 700 took 0.86x the time it took when
every written row was read (2026-12-05; 0.91x at 128, where the rows read are the same).
Leaves alone (skip reasons): masks that let a query see unwritten slots, ring buffers (their
positions are computed; measured, not just unmatched: the kernel given a ring's own mask over all
R slots, start 0, was tried on the 270M at 4,096 positions and took 1.06-1.20x the XNNPACK ring's
decode step at positions 1,500 and 3,000, 1.08-1.19x with a decode query's heads folded into
rows so K/V are read once, at the same logits), masks that read other inputs (e.g. vision runs),
prefix-case masks with batch / head dims other than 1, caches of other dtypes (float64),
caches with other readers, SDPAs without a mask, causal / dropout SDPAs, and caches already
(B, S, H, D) (so the pass is idempotent: a rewritten program has no SDPA on a cache left).
Rejects (PassError): a buffer that another method's rewrite by this pass object re-laid out but
this method cannot (or the other way round), since the methods share the buffer; the message
names the buffer, both methods and the reason.
Invariant: the logits equal the SDPA program's up to float summation order (the kernel's
blocked online softmax over ``start + L`` keys instead of a softmax over S columns), for
contiguous positions (chunked prefill then decode).
On by default in ``fxport export`` for XNNPACK (``--no-custom-sdpa`` leaves the attention in XNNPACK). The kernel splits heads over ExecuTorch's threadpool and
runs a GEMM per part that OpenMP threads inside each worker; those sums came out in a
run-dependent order: the quantized 270M's first logits took one of two values (22.5 apart) in
2-4 of 6 processes, in fxport's runtime and in the stock runner (greedy text then differs after
a few tokens; perplexity unchanged). fxport's runtime and its stock-runner wrappers now run the
methods with every OpenMP region on one thread
(:func:`fxport.runtime.pte_backend.one_openmp_level`): 18 of 18 processes agreed, and the runner
generates fxport's text. A native runner needs ``OMP_NUM_THREADS=1`` for the same (ExecuTorch's own
Llama exports, which use this kernel, share the property).
Runtime: the program then needs ExecuTorch's LLM custom-op kernels (``libcustom_ops_aot_lib``,
shipped in the executorch wheel and linked into ``llama_main`` and the demo apps);
:func:`fxport.contract.load_llm_kernels` registers them in a Python process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from fxport.passes.attention import CacheWrite, NotRecognized, attention_sites, find_cache_write
from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats
from fxport.passes.graph import (
    PROVENANCE,
    buffer_placeholders,
    call,
    copy_meta,
    dims_equal,
    input_spec,
    mark_mutated,
    meta_val,
    mutated_buffers,
    resize_buffer,
    shape,
    tensor_of,
    upper_bound,
    val,
)
from fxport.passes.match import ancestors

aten = torch.ops.aten

#: cache lengths up to which every start position is checked at L = 1
EXHAUSTIVE_UP_TO = 65536


def llama_ops():
    """``torch.ops.llama`` with ``custom_sdpa``'s fake kernel registered (ExecuTorch's custom-ops module)."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::* and their fakes)
    except Exception as exc:  # a broken / missing wheel: say what is missing
        raise PassError(f"CustomSDPA needs ExecuTorch's LLM custom ops (executorch.extension.llm.custom_ops): {exc}; "
                        "reinstall executorch, or build without the pass (fxport export --no-custom-sdpa)") from exc
    return torch.ops.llama


class _Skip(Exception):
    pass


class CustomSDPA(Pass):
    """Causal KV-cache attention as ``llama::custom_sdpa`` (see the module docstring)."""

    def __init__(self) -> None:
        self.layouts: dict[str, dict[str, str | None]] = {}  # method -> {buffer: None (re-laid out) | skip reason}

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        writes: dict[str, CacheWrite] = {}  # buffer -> its one write
        for name in mutated_buffers(ep):
            try:
                writes[name] = find_cache_write(ep, name)
            except NotRecognized:
                continue
        by_write = {w.node: name for name, w in writes.items()}  # write node -> buffer it writes
        sites, reasons, kinds = [], {}, {}
        for node, site in attention_sites(ep.graph):
            stats.matched += 1
            try:
                if isinstance(site, NotRecognized):
                    raise _Skip(f"not recognized: {site}")
                sites.append(self._check(ep, site, by_write, writes, kinds))
            except _Skip as exc:
                reasons[node] = str(exc)
                stats.skip(str(exc))
                for kv in () if isinstance(site, NotRecognized) else (site.key, site.value):
                    if kv.source in by_write:
                        reasons.setdefault(by_write[kv.source], str(exc))
        # A cache is re-laid out only if every one of its readers is a site rewritten here.
        changed = True
        while changed:
            changed = False
            for s in list(sites):
                bad = [b for b in s["buffers"] if b in reasons or not _only_read_by(writes[b].node, sites)]
                if bad:
                    sites.remove(s)
                    reason = reasons.get(bad[0], "cache read by something other than a causal SDPA")
                    stats.skip(reason)
                    reasons[s["node"]] = reason
                    for b in s["buffers"]:
                        reasons.setdefault(b, reason)
                    changed = True
        chosen = {b for s in sites for b in s["buffers"]}
        self._agree(ctx.method, {b: (None if b in chosen else reasons.get(b, "not a cache read by SDPA"))
                                 for b in set(chosen) | {b for b in reasons if isinstance(b, str)}})
        if not sites:
            return PassResult(ep, False, stats)
        llama = llama_ops()
        g = ep.graph
        new_writes: dict[str, Node] = {}
        for name in sorted(chosen):
            new_writes[name] = self._relayout(ep, name, writes[name])
        starts: dict[Node, Node] = {}
        prefixes: dict[tuple[Node, Node], tuple[Node | int, Node, Node]] = {}
        for s in sites:
            a = s["site"].args
            pos = s["pos"]
            if pos not in starts:  # after the placeholders, before every reader
                with g.inserting_before(next(n for n in g.nodes if n.op != "placeholder")):
                    first = call(g, aten.select.int, pos, 0, 0)
                with g.inserting_after(first):
                    start = call(g, aten._local_scalar_dense.default, first)
                with g.inserting_after(start):
                    call(g, aten.sym_constrain_range_for_size.default, start, min=0, max=s["S"] - 1)
                starts[pos] = start
            k_cache, v_cache = (new_writes[b] for b in s["buffers"])
            with g.inserting_before(a.node):
                qt = call(g, aten.permute.default, a.query, [0, 2, 1, 3])  # (B, L, H_q, D)
                if s["mask"] == CAUSAL:  # the kernel reads keys 0 .. start + L - 1 in place
                    out = call(g, llama.custom_sdpa.default, qt, k_cache, v_cache, starts[pos], None, 0.0, True,
                               s["scale"])  # (B, L, H_q, D)
                else:  # keys lo .. start + L - 1 copied out, the mask cut to them
                    key = (pos, a.attn_mask)
                    if key not in prefixes:
                        prefixes[key] = _prefix_mask(g, a.attn_mask, pos, starts[pos], s["S"], s["reach"])
                    lo, end, mask = prefixes[key]
                    k = call(g, aten.slice.Tensor, k_cache, 1, lo, end)  # (B, end - lo, H_kv, D)
                    v = k if v_cache is k_cache else call(g, aten.slice.Tensor, v_cache, 1, lo, end)
                    out = call(g, llama.custom_sdpa.default, qt, k, v, starts[pos], mask, 0.0, False, s["scale"])
                y = call(g, aten.permute.default, out, [0, 2, 1, 3])  # (B, H_q, L, D)
            copy_meta(a.node, y, PROVENANCE)
            a.node.replace_all_uses_with(y)
            g.erase_node(a.node)
            for user in list(y.users):  # the usual transpose(1, 2) back to (B, L, H_q, D) is the kernel's output
                if swaps_1_2(user, rank=4):
                    user.replace_all_uses_with(out)
                    g.erase_node(user)
            stats.rewritten += 1
            stats.sites.append({"sdpa": a.node.name, "buffers": list(s["buffers"]), "cache_len": s["S"],
                                "n_rep": s["site"].n_rep})
        g.eliminate_dead_code()
        return PassResult(ep, True, stats)

    # ------------------------------------------------------------------------ matching

    def _check(self, ep: ExportedProgram, site, by_write: dict[Node, str], cache_writes: dict[str, CacheWrite],
               kinds: dict) -> dict:
        """The site's rewrite plan, or _Skip; ``kinds`` memoizes :func:`_mask_kind` per mask (all
        layers of one kind share their mask node)."""
        a = site.args
        if a.dropout_p or a.is_causal:
            raise _Skip("dropout or causal SDPA")
        if not isinstance(a.attn_mask, Node):
            raise _Skip("SDPA without attn_mask")
        names = []
        for kv in (site.key, site.value):
            if kv.source not in by_write:
                raise _Skip("K/V not read from a cache written in this program")
            names.append(by_write[kv.source])
        writes = [cache_writes[n] for n in names]
        for w in writes:
            if w.kind not in ("index_copy", "index_put") or w.dim != 2:
                raise _Skip("cache write not an index_copy / index_put on dim 2 of (B, H, S, D)")
            if not (isinstance(w.positions, Node) and w.positions.op == "placeholder"
                    and input_spec(ep, w.positions).kind == InputKind.USER_INPUT):
                raise _Skip("cache written at computed positions (e.g. a ring buffer)")
        if writes[0].positions is not writes[1].positions:
            raise _Skip("K and V written at different positions")
        cval, qval = val(writes[0].cache), val(a.query)
        S = cval.shape[2]
        if not isinstance(S, int) or shape(writes[1].cache) != shape(writes[0].cache) and names[0] != names[1]:
            raise _Skip("symbolic or unequal cache lengths")
        if qval is None or qval.dtype != cval.dtype or not cval.dtype.is_floating_point:
            raise _Skip("query dtype differs from the caches'")
        if cval.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # the kernel's dtypes
            raise _Skip("cache dtype other than float32 / bfloat16 / float16")
        if val(writes[0].positions).dtype != torch.int64:
            raise _Skip("positions are not int64")
        chunk = upper_bound(ep, shape(writes[0].positions)[0])
        if not isinstance(chunk, int) and not (isinstance(chunk, float) and math.isfinite(chunk)):
            raise _Skip("chunk without an upper bound")
        key = (a.attn_mask, writes[0].positions, S, min(int(chunk), S))
        if key not in kinds:
            kinds[key] = _mask_kind(ep, *key)
        if isinstance(kinds[key], str):
            raise _Skip(kinds[key])
        kind, reach = kinds[key]
        mval = val(a.attn_mask)
        if kind == PREFIX and any(d != 1 for d in mval.shape[:-2]):
            raise _Skip("mask with batch / head dims (custom_sdpa takes one (L, S) mask)")
        return {"node": a.node, "site": site, "buffers": tuple(names), "pos": writes[0].positions, "S": S,
                "scale": a.scale_for(int(qval.shape[-1])), "mask": kind, "reach": reach}

    def _agree(self, method: str | None, layout: dict[str, str | None]) -> None:
        """Every method re-lays out the same buffers (they share them); records this method's choice."""
        for other, theirs in self.layouts.items():
            if other == method:
                continue
            for b in sorted(set(layout) & set(theirs)):  # the same buffer named every run
                if (layout[b] is None) != (theirs[b] is None):
                    mine_done, why = (other, method), theirs[b] if theirs[b] is not None else layout[b]
                    done_in, not_in = mine_done if theirs[b] is None else mine_done[::-1]
                    raise PassError(
                        f"CustomSDPA: cache {b} is shared by methods {other!r} and {method!r}; {done_in!r} moves it "
                        f"to custom_sdpa's (B, S, H, D) layout but {not_in!r} cannot ({why}). Give both methods the "
                        "same attention, or build without the pass (fxport export --no-custom-sdpa)")
        if method is not None:
            self.layouts[method] = layout

    # ------------------------------------------------------------------------ rewriting

    @staticmethod
    def _relayout(ep: ExportedProgram, name: str, write: CacheWrite) -> Node:
        """Buffer ``name`` (written by ``write``) becomes (B, S, H, D); returns its new write (the
        value SDPA reads)."""
        old = tensor_of(ep, buffer_placeholders(ep)[name])
        B, H, S, D = old.shape
        placeholder = resize_buffer(ep, name, torch.zeros(B, S, H, D, dtype=old.dtype, device=old.device))
        g = ep.graph
        with g.inserting_before(write.node):
            value, dims = write.value, shape(write.value)  # index_put broadcasts it: (H, L, D) for B = 1
            for _ in range(4 - len(dims)):
                value = call(g, aten.unsqueeze.default, value, 0)
            dims = (1,) * (4 - len(dims)) + tuple(dims)
            if (dims[0], dims[1], dims[3]) != (B, H, D):
                value = call(g, aten.expand.default, value, [B, H, -1, D])  # (B, H, L, D)
            if swaps_1_2(value):  # transpose(x, 1, 2): x is the rows
                rows = value.args[0]  # (B, L, H, D)
            else:
                rows = call(g, aten.permute.default, value, [0, 2, 1, 3])  # (B, L, H, D)
            new = call(g, aten.index_copy.default, placeholder, 1, write.positions, rows)  # (B, S, H, D)
        copy_meta(write.node, new, PROVENANCE)
        mark_mutated(ep, name, new)
        return new


def _only_read_by(write: Node, sites: list[dict]) -> bool:
    """The cache ``write`` feeds only the output and the K/V chains of ``sites``."""
    allowed: set[Node] = set()
    targets: set[Node] = set()
    for s in sites:
        for kv in (s["site"].key, s["site"].value):
            if kv.source is write:
                allowed.update(kv.chain)
                targets.add(s["node"])
    stack = [write]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output":
                if node is not write:
                    return False
            elif user in targets:
                continue
            elif user in allowed:
                stack.append(user)
            else:
                return False
    return True


def swaps_1_2(node: Node, rank: int | None = None) -> bool:
    """``transpose(x, 1, 2)`` / ``permute(x, [0, 2, 1, 3])`` of a rank-4 x (dims counted either
    way): (B, H, L, D) <-> (B, L, H, D). ``rank``: x's rank when the caller knows it (a node this
    pass just made has no shape metadata yet), else read from x's metadata."""
    if node.target is aten.transpose.int:
        swaps = sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    elif node.target is aten.permute.default:
        swaps = [d % 4 for d in node.args[1]] == [0, 2, 1, 3]
    else:
        return False
    return swaps and (rank if rank is not None else len(shape(node.args[0]) or ())) == 4


def _prefix_mask(g: torch.fx.Graph, mask: Node, pos: Node, start: Node, S: int,
                 reach: int) -> tuple[Node | int, Node, Node]:
    """(lo, end = start + L, the mask as a float (L, end - lo) additive mask), inserted after
    ``mask``. ``lo = max(0, start - reach + 1)`` when the mask's ``reach`` (a query at position p
    sees no slot below p - reach + 1) is shorter than the cache, else 0: a sliding window then
    reads at most ``reach + L - 1`` slots wherever it is."""
    import operator

    mval = val(mask)
    with g.inserting_before(mask.next):  # in creation order, right after the mask
        n = shape(pos)[0]
        length = n if isinstance(n, int) else call(g, aten.sym_size.int, pos, 0)
        end = call(g, operator.add, start, length)
        fits = call(g, operator.le, end, S)
        call(g, aten._assert_scalar.default, fits, f"custom_sdpa: a chunk reaches past the {S}-slot cache")
        m2 = call(g, aten.squeeze.dims, mask, list(range(mval.dim() - 2))) if mval.dim() > 2 else mask  # (L, S)
        if mval.dtype == torch.bool:
            zeros = call(g, aten.zeros_like.default, m2, dtype=torch.float32)
            m2 = call(g, aten.masked_fill.Scalar, zeros, call(g, aten.logical_not.default, m2), float("-inf"))
        elif mval.dtype != torch.float32:
            m2 = call(g, aten._to_copy.default, m2, dtype=torch.float32)
        lo = 0
        if reach < S:  # lo = start - back, back = min(start, reach - 1): slices of L + back <= reach + L - 1 rows
            first = start.args[0]  # pos[0], the tensor ``start`` is read from
            back = call(g, aten._local_scalar_dense.default, call(g, aten.clamp.default, first, None, reach - 1))
            call(g, aten.sym_constrain_range.default, back, min=0, max=reach - 1)
            call(g, aten._assert_scalar.default, call(g, operator.le, back, start),  # lo >= 0, for slice()
                 "custom_sdpa: a window reaching before position 0")
            lo = call(g, operator.sub, start, back)
        cut = call(g, aten.slice.Tensor, m2, 1, lo, end)  # (L, end - lo)
    return lo, end, cut


# ------------------------------------------------------------------------------ mask check

#: what :func:`_mask_kind` finds: every query sees exactly the slots up to its position, or
#: a subset of the slots written so far (e.g. a sliding window)
CAUSAL, PREFIX = "causal", "prefix"


def _mask_kind(ep: ExportedProgram, mask: Node, pos: Node, S: int, chunk: int) -> tuple[str, int] | str:
    """(:data:`CAUSAL` or :data:`PREFIX`, reach) for ``mask`` (a function of ``pos`` and
    constants), else why neither. ``reach``: the largest ``p - s + 1`` over every evaluated query
    (position p) and slot s it sees, i.e. the window (``p + 1`` for a causal mask)."""
    mval = val(mask)
    if mval is None or mval.shape[-1] != S:
        return "mask last dim is not the cache length"
    # a size equal to pos's length stands for L (export may read it off another input: the tokens)
    length = shape(pos)[0]
    sizes = set() if isinstance(length, int) else {
        n for n in ancestors([mask]) if n.target is aten.sym_size.int and dims_equal(meta_val(n), length)}
    nodes = ancestors([mask], stop=sizes) | sizes | {mask}
    consts: dict[Node, Any] = {}
    mutated = mutated_buffers(ep)
    for n in nodes:
        if n.op != "placeholder" or n is pos:
            continue
        spec = input_spec(ep, n)
        if spec.kind not in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.PARAMETER) or \
                spec.target in mutated:
            return "mask depends on another input"
        consts[n] = tensor_of(ep, n)
    order = [n for n in ep.graph.nodes if n in nodes]

    def evaluate(p: torch.Tensor) -> torch.Tensor:
        env: dict[Node, Any] = {pos: p, **consts, **{n: len(p) for n in sizes}}
        for n in order:
            if n in env:
                continue
            if n.op != "call_function":
                raise ValueError(n.op)
            args = torch.fx.node.map_arg(n.args, lambda x: env[x])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda x: env[x])
            env[n] = n.target(*args, **kwargs)
        return env[mask]

    starts_1 = range(S) if S <= EXHAUSTIVE_UP_TO else sorted({*range(0, S, max(1, S // 4096)), S - 1})
    L = max(1, chunk)
    starts_l = sorted({0, 1, S - L, *range(0, S - L + 1, max(1, (S - L) // 16 or 1))} & set(range(S - L + 1)))
    k = torch.arange(S)
    causal, reach = True, 1
    try:
        with torch.no_grad():
            for n_rows, starts in ((1, starts_1), (L, starts_l)):
                for st in starts:
                    p = torch.arange(st, st + n_rows)
                    m = evaluate(p)
                    if m.dtype == torch.bool:
                        seen = m
                    elif m.dtype.is_floating_point:
                        finite = torch.isfinite(m)
                        if bool((m[finite] != 0).any()) or bool((m[~finite] > 0).any()):
                            return "additive mask with values other than 0 and -inf"
                        seen = finite
                    else:
                        return "mask neither bool nor float"
                    want = k[None, :] <= p[:, None]  # (L, S)
                    if seen.shape[-2:] != want.shape:
                        return "mask shape differs from (L, S)"
                    seen = seen.reshape(-1, *want.shape)
                    if bool((seen & ~want).any()):
                        return "mask lets a query see slots not written yet"
                    if not bool(seen.any(-1).all()):
                        return "mask hides every slot from some query"
                    causal = causal and bool((seen == want).all())
                    first = torch.where(seen, k, S).amin(-1)  # (..., L) the lowest slot each query sees
                    reach = max(reach, int((p - first).max()) + 1)
    except Exception as exc:  # an op the evaluation cannot run on real tensors
        return f"mask could not be evaluated ({type(exc).__name__})"
    return (CAUSAL if causal else PREFIX), reach


__all__ = ["CustomSDPA", "llama_ops", "swaps_1_2"]
