"""SDPAAsMatmul on drawn attention sites: batch (static or dynamic), GQA ratio and spelling,
query length (static or dynamic), key length, head dims (V's may differ from Q/K's), additive
mask shapes, scale, dtype, and a ``transpose(1, 2).reshape`` reader of the output.

The expected path per site follows the contract: the GQA fold (L == 1 with a mask of S
elements, or a (1, 1, L|1, S) mask, or none, on a peeled K/V spelling with a static batch), the
unfolded matmul otherwise, a skip for bool masks, causal / dropout SDPA and enable_gqa sites that
do not fold. The rewritten program equals the unrewritten one within fp32 summation order, an
fp64 attention written without SDPA within the dtype's tolerance, and a second run changes
nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from torch.export import Dim

from fxport.passes import SDPAAsMatmul

from fxport.tests.passes.hypothesis_helpers import (GQA_SPELLINGS, additive, assert_idempotent, attention_fp64, examples, expand_kv,
                                  keep_mask, ops, run_pass)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
#: |got - fp64| <= TOL * (1 + |fp64|)
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class Site(nn.Module):
    def __init__(self, spelling, n_rep, is_causal, scale, flat_out):
        super().__init__()
        self.spelling, self.n_rep, self.is_causal = spelling, n_rep, is_causal
        self.scale, self.flat_out = scale, flat_out

    def forward(self, q, k, v, mask=None):  # q (B, H_q, L, D), k (B, H_kv, S, D), v (B, H_kv, S, D_v)
        k, v = expand_kv(k, self.n_rep, self.spelling), expand_kv(v, self.n_rep, self.spelling)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal, scale=self.scale,
                                           enable_gqa=self.spelling == "enable_gqa")  # (B, H_q, L, D_v)
        if self.flat_out:  # the attention module's reader: (B, L, H_q * D_v)
            B, H, L, Dv = y.shape
            return y.transpose(1, 2).reshape(B, L, H * Dv)
        return y


# (a 1-d (S,) mask is not drawn: aten SDPA's meta function rejects it, so it does not export)
MASKS = ["none", "bool", "causal", "(1,1,L,S)", "(B,1,L,S)", "(1,H,L,S)", "(B,H,L,S)", "(L,S)", "(1,1,1,S)"]


def _mask_shape(kind, B, H, L, S):
    return {"(1,1,L,S)": (1, 1, L, S), "(B,1,L,S)": (B, 1, L, S), "(1,H,L,S)": (1, H, L, S),
            "(B,H,L,S)": (B, H, L, S), "(L,S)": (L, S), "(1,1,1,S)": (1, 1, 1, S),
            "bool": (1, 1, L, S)}.get(kind)


@st.composite
def sites(draw, mask=st.sampled_from(MASKS)):
    n_rep = draw(st.sampled_from([1, 2, 3]))
    c = dict(B=draw(st.sampled_from([1, 2])), H_kv=draw(st.sampled_from([1, 2])), n_rep=n_rep,
             spelling=draw(st.sampled_from(GQA_SPELLINGS + (("direct",) if n_rep == 1 else ()))),
             L=draw(st.integers(1, 5)), S=draw(st.integers(1, 12)),
             dynamic=draw(st.sampled_from([None, "L", "B"])),  # which dim is dynamic
             D=draw(st.sampled_from([4, 8])), mask=draw(mask),
             scale=draw(st.sampled_from([None, 0.25])), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
             flat_out=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    c["Dv"] = c["D"]  # V with its own head dim: see test_value_head_dim_other_than_query_head_dim
    if c["dynamic"] == "L":
        c["L"] = max(c["L"], 2)  # export specializes a dynamic dim seen as 1
    if c["dynamic"] == "B":
        c["B"] = 2
    if c["mask"] == "causal":
        c["S"] = max(c["S"], c["L"])  # every row sees a key under aten's top-left rule
    return c


def _expected(c):
    """(skip reason or None, folded) from the contract."""
    if c["mask"] == "causal":
        return "dropout or causal", False
    if c["mask"] == "bool":
        return "bool mask (run AdditiveAttentionMask first)", False
    shape = _mask_shape(c["mask"], c["B"], c["H_kv"] * c["n_rep"], c["L"], c["S"])
    peeled = c["dynamic"] != "B" and (  # the fold needs a static batch
        c["spelling"] in ("repeat_kv", "repeat_interleave") or (c["spelling"] == "enable_gqa" and c["n_rep"] > 1))
    numel = 1
    for d in shape or ():
        numel *= d
    fold = peeled and c["L"] == 1 and (shape is None or numel == c["S"])  # a dynamic L is >= 2 here
    fold_many = peeled and not fold and (shape is None or (len(shape) == 4 and shape[:2] == (1, 1)))
    if c["spelling"] == "enable_gqa" and not (fold or fold_many):
        return "enable_gqa with a mask that does not fold over the K/V heads", False
    return None, fold or fold_many


def _check_site(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H_kv, n_rep, L, S, D, Dv, dt = (c[k] for k in ("B", "H_kv", "n_rep", "L", "S", "D", "Dv", "dtype"))
    H = H_kv * n_rep

    def inputs(L, B):
        q = torch.randn(B, H, L, D, generator=g).to(dt)
        k, v = torch.randn(B, H_kv, S, D, generator=g).to(dt), torch.randn(B, H_kv, S, Dv, generator=g).to(dt)
        shape = _mask_shape(c["mask"], B, H, L, S)
        if shape is None:
            return (q, k, v), None
        keep = keep_mask(shape, c["seed"] + L)
        mask = keep if c["mask"] == "bool" else additive(keep, dt)
        return (q, k, v, mask), mask

    args, _ = inputs(L, B)
    shapes = None
    if c["dynamic"]:  # q's L or B, K/V's B, and the mask's dim of that name (a broadcast 1 stays static)
        dim = Dim(c["dynamic"], min=2, max=8)
        at = {"L": 2, "B": 0}[c["dynamic"]]
        shapes = ({at: dim}, {0: dim} if at == 0 else None, {0: dim} if at == 0 else None)
        if len(args) > 3:
            kind = "(1,1,L,S)" if c["mask"] == "bool" else c["mask"]
            names = kind.strip("()").split(",")
            shapes += ({names.index(c["dynamic"]): dim} if c["dynamic"] in names else None,)
    model = Site(c["spelling"], n_rep, c["mask"] == "causal", c["scale"], c["flat_out"])
    ep = torch.export.export(model, args, dynamic_shapes=shapes)
    new, rec = run_pass(ep, SDPAAsMatmul())

    reason, folded = _expected(c)
    event(f"skipped: {reason}" if reason else "rewritten: GQA folded" if folded else "rewritten: matmul")
    st_ = rec.stats
    if reason is not None:
        assert (rec.changed, st_.matched, st_.rewritten, dict(st_.skipped)) == (False, 1, 0, {reason: 1})
        assert ops(new)[SDPA] == 1
        return
    assert (rec.changed, st_.matched, st_.rewritten, dict(st_.skipped)) == (True, 1, 1, {})
    assert [(s["gqa_folded"], s["n_rep"]) for s in st_.sites] == [(folded, n_rep)]
    counts = ops(new)
    assert counts[SDPA] == 0
    if folded:  # (B*H_kv, ., D) bmm with the un-expanded K/V: no head copies left
        assert counts[aten.bmm.default] == 2 and counts[aten.matmul.default] == 0
        assert counts[aten.expand.default] == counts[aten.repeat_interleave.self_int] == 0
    else:
        assert counts[aten.matmul.default] == 2
    assert_idempotent(new, SDPAAsMatmul())

    for length, batch in {(L, B), (L + 3, B) if c["dynamic"] == "L" else (L, 3) if c["dynamic"] == "B" else (L, B)}:
        args, mask = inputs(length, batch)
        got, ref = new.module()(*args), ep.module()(*args)
        tol = TOL[dt]
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)  # summation order (and bf16 rounding)
        want = attention_fp64(*args[:3], mask=mask, scale=c["scale"])
        if c["flat_out"]:
            want = want.transpose(1, 2).reshape(got.shape)
        assert ((got.double() - want).abs() <= tol * (1 + want.abs())).all()


@pytest.mark.parametrize("mask", MASKS)  # each mask kind drawn (few examples drift to a few kinds)
@examples(2)
@given(data=st.data())
def test_any_site_rewrites_by_contract_and_equals_attention(mask, data):
    _check_site(data.draw(sites(st.just(mask)), label="site"))


# V's head dim may differ from Q/K's (SDPA allows it); the GQA fold once viewed V with the query's
# D and crashed ("shape '[1, 3, 8]' is invalid for input of size 12"): folded sites drawn too.
@examples(4)
@given(sites(), st.sampled_from([2, 12]))
def test_value_head_dim_other_than_query_head_dim(c, Dv):
    c["Dv"] = Dv
    _check_site(c)


def test_folded_site_with_a_narrower_value_head():
    """The reported case: q (1, 2, 1, 8), k (1, 1, 3, 8), v (1, 1, 3, 4), K/V repeated by
    repeat_interleave(2, dim=1): folded, and equal to SDPA's (1, 2, 1, 4) attention."""

    class Site(torch.nn.Module):
        def forward(self, q, k, v):
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    ep = torch.export.export(Site(), (q, k, v))
    new, rec = run_pass(ep, SDPAAsMatmul())
    assert (rec.stats.rewritten, rec.stats.sites[0]["gqa_folded"]) == (1, True)
    got, want = new.module()(q, k, v), Site()(q, k, v)
    assert got.shape == (1, 2, 1, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
