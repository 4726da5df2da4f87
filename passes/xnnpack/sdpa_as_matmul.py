"""SDPAAsMatmul: ``aten.scaled_dot_product_attention`` as matmul / softmax / matmul, GQA folded.

The stock edge decomposition of SDPA scales with ``mul.Scalar`` and guards fully-masked rows
with ``where`` / ``any``, which XNNPACK does not take, and a GQA program copies the cache
n_rep times per step (the expand of the repeat).

Matches: SDPA (arguments and K/V chains read by :func:`fxport.passes.attention.attention_site`)
with a 4-d query (B, H_q, L, D), ``dropout_p=0``, ``is_causal=False``, a float additive mask or
none (run :class:`~fxport.passes.xnnpack.AdditiveAttentionMask` first for bool masks).
Produces ``softmax(q @ k^T * scale + mask) @ v`` in ops XNNPACK lowers. When K/V reach SDPA
through a GQA spelling (``repeat_interleave(n, dim=1)``, the repeat_kv ``unsqueeze -> expand
-> clone -> view`` chain, or ``enable_gqa=True``) with a static batch, the repetition is
folded away: q is viewed as (B*H_kv, n_rep*L, D) and multiplied with the un-expanded cache
(B*H_kv, S, D) (3-d bmm: a 4-d matmul decomposes with expand copies of the cache), so the
cache is never copied n_rep times per step. L == 1 takes a mask of S elements; L > 1 (also a
dynamic L) a (1, 1, L, S) mask, added on a (B*H_kv, n_rep, L, S) view of the scores.
Otherwise (other masks, symbolic batch, a cast in the K/V chain) the expanded K/V are
multiplied as they are.
Leaves alone (skip reasons): bool masks, causal / dropout SDPA, non-4-d inputs, and
``enable_gqa`` sites whose mask does not fold (no expanded K/V exists to multiply). The
rewritten program has no SDPA left, so the pass is idempotent.
Invariant: equal up to fp32 summation order for rows that see at least one key.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from fxport.passes.attention import NotRecognized, attention_site, is_sdpa
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import call, val

aten = torch.ops.aten


class SDPAAsMatmul(Pass):
    """SDPA as matmul / softmax / matmul with the GQA fold (see the module docstring)."""

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        g = ep.graph
        for node in list(g.nodes):
            if not is_sdpa(node):
                continue
            stats.matched += 1
            try:
                site = attention_site(node)
            except NotRecognized as exc:
                stats.skip(f"not recognized: {exc}")
                continue
            a = site.args
            q, k, v, mask = a.query, a.key, a.value, a.attn_mask
            qv, mv = val(q), val(mask)
            if a.dropout_p or a.is_causal:
                stats.skip("dropout or causal")
                continue
            if val(k) is None or val(k).dim() != 4:
                stats.skip("inputs not 4-d")
                continue
            if mask is not None and (mv is None or mv.dtype == torch.bool):
                stats.skip("bool mask (run AdditiveAttentionMask first)")
                continue
            B, Hq, L, D = qv.shape
            Dv = val(v).shape[-1] if val(v) is not None else D  # V's head dim may differ from Q/K's
            scale = a.scale_for(D)
            kx, vx, n = site.key.source, site.value.source, site.n_rep
            peeled = (site.key.spelling != "direct" and isinstance(B, int) and isinstance(Hq, int)
                      and val(kx).dtype == qv.dtype and val(vx).dtype == qv.dtype)
            fold = peeled and isinstance(L, int) and L == 1 and (mask is None or mv.numel() == mv.shape[-1])
            # prefill (L > 1 or dynamic): same fold, the mask broadcast over (B*H_kv, n_rep)
            fold_many = (peeled and not fold
                         and (mask is None or (mv.dim() == 4 and mv.shape[0] == 1 and mv.shape[1] == 1)))
            if a.enable_gqa and not (fold or fold_many):
                stats.skip("enable_gqa with a mask that does not fold over the K/V heads")
                continue
            with g.inserting_before(node):
                if fold_many:
                    Hkv = Hq // n
                    S = val(kx).shape[2]
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
                    v3 = call(g, aten.view.default, vx, [B * Hkv, S, Dv])
                    out = call(g, aten.bmm.default, probs, v3)  # (B*H_kv, n_rep*L, Dv)
                    out = call(g, aten.view.default, out, [B, Hq, -1, Dv])  # (B, H_q, L, Dv)
                elif fold:
                    Hkv = Hq // n
                    S = val(kx).shape[2]
                    qg = call(g, aten.view.default, q, [B * Hkv, n, D])  # (B*H_kv, n_rep, D)
                    k3 = call(g, aten.view.default, kx, [B * Hkv, S, D])
                    kt = call(g, aten.transpose.int, k3, 1, 2)  # (B*H_kv, D, S)
                    scores = call(g, aten.bmm.default, qg, kt)  # (B*H_kv, n_rep, S)
                    scores = call(g, aten.mul.Tensor, scores, scale)
                    if mask is not None:  # (1, 1, 1, S) -> (1, 1, S) to broadcast over B*H_kv
                        scores = call(g, aten.add.Tensor, scores,
                                      call(g, aten.view.default, mask, [1, 1, mv.shape[-1]]))
                    probs = call(g, aten._softmax.default, scores, -1, False)
                    v3 = call(g, aten.view.default, vx, [B * Hkv, S, Dv])
                    out = call(g, aten.bmm.default, probs, v3)  # (B*H_kv, n_rep, Dv)
                    out = call(g, aten.view.default, out, [B, Hq, 1, Dv])
                else:
                    kt = call(g, aten.transpose.int, k, 2, 3)
                    scores = call(g, aten.matmul.default, q, kt)  # (B, H_q, L, S)
                    scores = call(g, aten.mul.Tensor, scores, scale)
                    if mask is not None:
                        scores = call(g, aten.add.Tensor, scores, mask)  # (1, 1, L, S) broadcasts
                    probs = call(g, aten._softmax.default, scores, -1, False)
                    out = call(g, aten.matmul.default, probs, v)
            # SDPA returns a (B, L, H, D)-strided tensor that callers view after transposing;
            # matmul's output is (B, H, L, D)-contiguous, so such views become reshapes. Views
            # between the SDPA and its transpose (transformers 5 views the output to (B, H, L, D)
            # first) are followed, and become reshapes too.
            frontier = list(node.users)
            while frontier:
                user = frontier.pop()
                if user.target is aten.view.default:
                    user.target = aten.reshape.default
                    frontier.extend(user.users)
                elif user.target is aten.transpose.int:
                    for view in user.users:
                        if view.target is aten.view.default:
                            view.target = aten.reshape.default
            out.meta["val"] = node.meta.get("val")  # an SDPA reading this one sees its shape and dtype
            node.replace_all_uses_with(out)
            g.erase_node(node)
            stats.rewritten += 1
            stats.sites.append({"node": node.name, "gqa_folded": fold or fold_many, "gqa": site.key.spelling,
                                "n_rep": n})
        if stats.rewritten:
            g.eliminate_dead_code()
        return PassResult(ep, stats.rewritten > 0, stats)


__all__ = ["SDPAAsMatmul"]
