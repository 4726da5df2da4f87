"""SDPADispatch: pick an attention kernel per ``aten.scaled_dot_product_attention`` call site.

Matches: ``aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal,
    scale, enable_gqa)`` with 4-d q (B, H_q, L, D), D <= 512, float16/bfloat16/float32,
    a bool (True = attend) or float additive mask (or none), and K/V read through any GQA
    spelling :func:`fxport.passes.attention.peel_kv` recognizes: ``repeat_interleave(n, dim=1)``
    (ExecuTorch's Llama), the repeat_kv chain ``unsqueeze(x, 2) -> expand(B, H_kv, n_rep, S, D)
    -> [clone] -> reshape/view/_unsafe_view(B, H_kv * n_rep, S, D)`` (transformers), or
    ``enable_gqa=True`` with (B, H_kv, S, D), copy-like ops in between. The expansion is
    peeled: the kernels read the UN-expanded cache (B, H_kv, S, D) (native GQA), never the
    n_rep-times larger copy.
Produces, per site:
    * 1 <= L <= 4 (static: a decode or speculative-verification step; the mask carries the
      causal rule per query row) and S > ``threshold`` and not ``is_causal`` ->
      ``fxport::sdpa_decode_splitk(q, k, v, mask, valid_len, scale)``;
    * otherwise ``fxport::sdpa(q, k, v, mask, valid_len, scale, is_causal, 0)`` (the tiled
      kernel), or, with ``fallback="aten"``, the aten call is left for the backend.
    ``valid_len`` is computed in the graph from the mask (1 + the largest key index that any
    query row attends to, per batch row), so kernels skip the KV blocks past it; it is shared
    by all sites that read the same mask node. Without a mask (or ``valid_len=False``) it is None.
Leaves alone (counted in ``stats.skipped[reason]``): dropout, head dim > 512, other dtypes,
    masks of other dtypes/ranks, K/V whose head layout it cannot prove (e.g. an expand that is
    not the repeat_kv order), K and V with different head counts, a cast between the cache and
    SDPA (the kernels would read the cache's dtype).
Invariant: the op computes the same attention as the aten call (the CPU reference impl calls
    aten SDPA on the expanded K/V with the same mask, so on CPU the rewritten program equals
    the original bit for bit); the Triton kernels are equal within float tolerance.
Idempotent: the rewritten program has no matching aten SDPA left (``fallback="aten"`` sites
    are left unchanged, so a second run changes nothing either).

Stats: one ``sites`` entry per call site: node, module (the attention module's FQN when
export recorded it), q/kv shapes (kv: the peeled source), kv buffer (when the K source is a
cache buffer), gqa (the K/V spelling peeled), choice (``sdpa_decode_splitk`` | ``sdpa`` |
``aten``) and the reason.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import fxport.kernels.ops  # noqa: F401  (registers torch.ops.fxport.*)
from fxport.kernels.attention_ops import MAX_DECODE_QUERIES
from fxport.passes.attention import NotRecognized, attention_site, is_sdpa
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import buffer_placeholders, call, copy_meta, module_path, plain_shape, shape, val

aten = torch.ops.aten
MAX_HEAD_DIM = 512
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Skip(Exception):
    """A call site that does not match; the message is the skip reason."""


def _kv_buffer(ep: ExportedProgram, node: Node) -> str | None:
    """FQN of the cache buffer a K source was written into (through index_copy/gather/views)."""
    by_node = {n: fqn for fqn, n in buffer_placeholders(ep).items()}
    seen = 0
    while isinstance(node, Node) and seen < 16:
        if node in by_node:
            return by_node[node]
        if node.op != "call_function" or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


class SDPADispatch(Pass):
    """Per call site: split-K decode, tiled Triton SDPA, or aten SDPA (see module docstring).

    Args:
        threshold: split-K when L_q <= 4 and L_kv > threshold (default 2048: the crossover
            measured by ``bench/sdpa.py``; sliding-window ring caches stay below it).
        fallback: ``"tiled"`` rewrites the other sites to ``fxport::sdpa``; ``"aten"`` leaves
            them to the backend.
        valid_len: compute the valid KV length from the mask in-graph and pass it to the
            kernels (block skipping). Off: kernels sweep the whole cache (mask only).
    """

    def __init__(self, threshold: int = 2048, fallback: Literal["tiled", "aten"] = "tiled", valid_len: bool = True):
        if fallback not in ("tiled", "aten"):
            raise ValueError(f"SDPADispatch: fallback must be 'tiled' or 'aten'; got {fallback!r}")
        if threshold < 0:
            raise ValueError(f"SDPADispatch: threshold must be >= 0; got {threshold}")
        self.threshold, self.fallback, self.use_valid_len = threshold, fallback, valid_len

    def __repr__(self) -> str:
        return f"SDPADispatch(threshold={self.threshold}, fallback={self.fallback!r}, valid_len={self.use_valid_len})"

    # ------------------------------------------------------------------ analysis

    def _analyze(self, node: Node) -> dict:
        try:
            site = attention_site(node)
        except NotRecognized as exc:
            raise _Skip(str(exc)) from None
        a = site.args
        if a.dropout_p != 0.0:
            raise _Skip("dropout")
        qv = val(a.query)
        if qv.dtype not in _DTYPES:
            raise _Skip(f"dtype {qv.dtype}")
        B, H_q, L, D = qv.shape
        if not isinstance(D, int):
            raise _Skip("symbolic heads or head dim")
        if D > MAX_HEAD_DIM:
            raise _Skip(f"head dim {D} > {MAX_HEAD_DIM}")
        k, v = site.key.source, site.value.source
        ks, vs = shape(k), shape(v)
        if ks != vs:
            raise _Skip(f"k {plain_shape(ks)} and v {plain_shape(vs)} sources differ in shape")
        if ks[3] != D:
            raise _Skip(f"kv {plain_shape(ks)} does not fit query heads {H_q} / head dim {D}")
        if val(k).dtype != qv.dtype or val(v).dtype != qv.dtype:
            raise _Skip("K/V cast between the cache and SDPA (source dtype differs from the query's)")
        mask = a.attn_mask
        if mask is not None:
            mv = val(mask)
            if mv is None or mv.dim() > 4 or not (mv.dtype == torch.bool or mv.dtype in _DTYPES):
                raise _Skip("mask neither bool nor float of rank <= 4")
        return dict(q=a.query, k=k, v=v, mask=mask, scale=a.scale_for(D), is_causal=a.is_causal,
                    B=B, H_q=H_q, L=L, D=D, H_kv=ks[1], S=ks[2], gqa=site.key.spelling, n_rep=site.n_rep)

    def _choose(self, site: dict) -> tuple[str, str]:
        L, S = site["L"], site["S"]
        if not isinstance(S, int):
            return self._fallback_choice("symbolic L_kv")
        if isinstance(L, int) and 1 <= L <= MAX_DECODE_QUERIES:  # decode / speculative verification
            if site["is_causal"]:  # aten's top-left rule: query i sees keys 0..i only
                return self._fallback_choice(f"is_causal decode (only keys 0..{L - 1} attend)")
            if S > self.threshold:
                return "sdpa_decode_splitk", f"L_q={L}, L_kv={S} > threshold {self.threshold}"
            return self._fallback_choice(f"L_q={L}, L_kv={S} <= threshold {self.threshold}")
        return self._fallback_choice(f"L_q={L} > {MAX_DECODE_QUERIES} (prefill)")

    def _fallback_choice(self, reason: str) -> tuple[str, str]:
        return ("sdpa" if self.fallback == "tiled" else "aten"), reason

    # ------------------------------------------------------------------ rewrite

    def _valid_len(self, graph, mask: Node, before: Node, cache: dict) -> Node | None:
        """(B_mask,) or () int32: 1 + last key index any query row attends to; 0 if none.

        Inserted before the first site that reads ``mask`` and shared by the later ones.
        """
        if mask in cache:
            return cache[mask]
        mv = val(mask)
        S = mv.shape[-1]
        if not isinstance(S, int):  # a dynamic key length: sweep everything (mask only)
            return None
        with graph.inserting_before(before):
            keep = mask if mv.dtype == torch.bool else call(graph, aten.gt.Scalar, mask, float("-inf"))
            pos = graph.call_function(aten.arange.start_step, (1, S + 1, 1), {"dtype": torch.int32, "device": mv.device})
            idx = call(graph, aten.mul.Tensor, keep, pos)  # (..., S) int32, 0 where masked
            dims = list(range(1, mv.dim())) if mv.dim() == 4 else list(range(mv.dim()))
            vl = call(graph, aten.amax.default, idx, dims)
        cache[mask] = vl
        return vl

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        graph = ep.graph
        vl_cache: dict = {}
        changed = False
        for node in list(graph.nodes):
            if not is_sdpa(node):
                continue
            stats.matched += 1
            try:
                site = self._analyze(node)
            except _Skip as exc:
                stats.skip(str(exc))
                stats.sites.append({"node": node.name, "module": module_path(node), "q": plain_shape(shape(node.args[0])),
                                    "choice": "aten", "reason": str(exc)})
                continue
            choice, reason = self._choose(site)
            stats.sites.append({
                "node": node.name,
                "module": module_path(node),
                "q": plain_shape(shape(site["q"])),
                "kv": plain_shape(shape(site["k"])),
                "kv_buffer": _kv_buffer(ep, site["k"]),
                "gqa": site["gqa"],
                "choice": choice,
                "reason": reason,
            })
            if choice == "aten":
                continue
            mask = site["mask"]
            vl = self._valid_len(graph, mask, node, vl_cache) if (mask is not None and self.use_valid_len) else None
            with graph.inserting_before(node):
                if choice == "sdpa_decode_splitk":
                    new = call(graph, torch.ops.fxport.sdpa_decode_splitk.default,
                               site["q"], site["k"], site["v"], mask, vl, site["scale"])
                else:
                    new = call(graph, torch.ops.fxport.sdpa.default,
                               site["q"], site["k"], site["v"], mask, vl, site["scale"], site["is_causal"], 0)
            copy_meta(node, new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            stats.rewritten += 1
            changed = True
        if changed:
            graph.eliminate_dead_code()
        return PassResult(ep, changed, stats)


__all__ = ["SDPADispatch"]
