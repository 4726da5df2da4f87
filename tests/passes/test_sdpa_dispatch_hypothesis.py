"""SDPADispatch on drawn attention sites: batch, GQA ratio and spelling, query / key lengths,
head dim, mask kind and shape, causal, scale, dtype, threshold, fallback and valid_len.

Per site the expected choice is computed from the contract (split-K iff 1 <= L <= 4, not
causal and S > threshold; else the tiled op, or aten with ``fallback="aten"``) and checked
against the stats and the op counts; the rewritten program equals the unrewritten one bit for
bit on CPU (the ops' CPU reference impls call aten SDPA on the same values) and an fp64
attention written without SDPA within the dtype's tolerance; a second run changes nothing.
Sites the pass must leave alone are drawn too, each with its exact skip reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st

import fxport.kernels.ops  # noqa: F401  (registers torch.ops.fxport.*)
from fxport.passes import SDPADispatch

from fxport.tests.passes.hypothesis_helpers import (GQA_SPELLINGS, additive, assert_idempotent, attention_fp64, examples,
                                 expand_kv, keep_mask, ops, run_pass)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SPLITK = torch.ops.fxport.sdpa_decode_splitk.default
TILED = torch.ops.fxport.sdpa.default
#: |got - fp64| <= TOL * (1 + |fp64|): fp32 summation order / bf16 rounding of q, k, v and output
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


class Site(nn.Module):
    """One SDPA whose K/V reach it through ``spelling`` (see :func:`expand_kv`)."""

    def __init__(self, spelling: str, n_rep: int, is_causal: bool, scale: float | None):
        super().__init__()
        self.spelling, self.n_rep, self.is_causal, self.scale = spelling, n_rep, is_causal, scale

    def forward(self, q, k, v, mask=None):  # q (B, H_q, L, D), k/v (B, H_kv, S, D)
        k, v = expand_kv(k, self.n_rep, self.spelling), expand_kv(v, self.n_rep, self.spelling)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal, scale=self.scale,
                                              enable_gqa=self.spelling == "enable_gqa")


MASKS = ["none", "causal", "bool", "float"]


@st.composite
def sites(draw, mask=st.sampled_from(MASKS)):
    B, H_kv = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    spelling = draw(st.sampled_from(GQA_SPELLINGS + (("direct",) if n_rep == 1 else ())))
    L, S = draw(st.integers(1, 6)), draw(st.integers(1, 24))
    S = max(S, L)  # aten's is_causal needs S >= L for every row to see a key
    D = draw(st.sampled_from([4, 8, 16]))
    mask = draw(mask)
    mask_shape = draw(st.sampled_from([(1, 1, L, S), (B, 1, L, S), (B, 1, 1, S), (B, H_kv * n_rep, L, S), (L, S)]))
    return dict(B=B, H_kv=H_kv, n_rep=n_rep, spelling=spelling, L=L, S=S, D=D, mask=mask, mask_shape=mask_shape,
                valid=draw(st.lists(st.integers(1, S), min_size=mask_shape[0], max_size=mask_shape[0])),
                scale=draw(st.sampled_from([None, 0.3])), dtype=draw(st.sampled_from(list(TOL))),
                threshold=draw(st.integers(0, 26)), fallback=draw(st.sampled_from(["tiled", "aten"])),
                valid_len=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H_kv, L, S, D, dt = c["B"], c["H_kv"], c["L"], c["S"], c["D"], c["dtype"]
    q = torch.randn(B, H_kv * c["n_rep"], L, D, generator=g).to(dt)
    k, v = (torch.randn(B, H_kv, S, D, generator=g).to(dt) for _ in range(2))
    if c["mask"] in ("none", "causal"):
        return (q, k, v), None
    # mask rows hide every key past a drawn valid length (per mask batch row): what valid_len reads
    keep = keep_mask(c["mask_shape"], c["seed"], c["valid"] if len(c["mask_shape"]) == 4 else None)
    mask = keep if c["mask"] == "bool" else additive(keep, dt)
    return (q, k, v, mask), mask


def _expected_choice(c) -> str:
    if c["L"] <= 4 and c["mask"] != "causal" and c["S"] > c["threshold"]:
        return "sdpa_decode_splitk"
    return "sdpa" if c["fallback"] == "tiled" else "aten"


@pytest.mark.parametrize("mask", MASKS)  # each mask kind drawn (few examples drift to a few kinds)
@examples(3)
@given(data=st.data())
def test_any_site_dispatches_by_contract_and_equals_aten(mask, data):
    c = data.draw(sites(st.just(mask)), label="site")
    args, mask = _inputs(c)
    model = Site(c["spelling"], c["n_rep"], c["mask"] == "causal", c["scale"])
    ep = torch.export.export(model, args)
    p = SDPADispatch(threshold=c["threshold"], fallback=c["fallback"], valid_len=c["valid_len"])
    new, rec = run_pass(ep, p)

    choice = _expected_choice(c)
    event(f"{choice}, {c['spelling']}")
    rewritten = choice != "aten"
    (site,) = rec.stats.sites
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (
        rewritten, 1, int(rewritten), {})
    assert site["choice"] == choice and site["kv"] == (c["B"], c["H_kv"], c["S"], c["D"])  # the peeled source
    if c["n_rep"] > 1:
        assert site["gqa"] == c["spelling"]
    counts = ops(new)
    assert (counts[SPLITK], counts[TILED], counts[SDPA]) == (
        int(choice == "sdpa_decode_splitk"), int(choice == "sdpa"), int(choice == "aten"))
    if rewritten:  # native GQA: the kernels read the (B, H_kv, S, D) tensors, no head copies left
        assert counts[aten.expand.default] == counts[aten.repeat_interleave.self_int] == 0
        assert counts[aten.amax.default] == int(mask is not None and c["valid_len"])  # one valid_len per mask

    got = new.module()(*args)
    # CPU reference impls: aten SDPA on the same values, mask folded with valid_len -> bit for bit
    torch.testing.assert_close(got, ep.module()(*args), rtol=0, atol=0)
    want = attention_fp64(*args[:3], mask=mask, scale=c["scale"], is_causal=c["mask"] == "causal")
    tol = TOL[c["dtype"]]
    assert ((got.double() - want).abs() <= tol * (1 + want.abs())).all()
    assert_idempotent(new, p)


class Cache(nn.Module):
    """A decode/verify step on a KV cache: index_copy_ at input_pos, a causal (optionally
    sliding) bool mask from input_pos, repeat_kv, SDPA; ``kv_buffer`` names ``k_cache``."""

    def __init__(self, B, H_kv, n_rep, S, D, window, spelling):
        super().__init__()
        self.n_rep, self.window, self.spelling = n_rep, window, spelling
        self.register_buffer("k_cache", torch.zeros(B, H_kv, S, D))
        self.register_buffer("v_cache", torch.zeros(B, H_kv, S, D))

    def forward(self, q, k, v, input_pos):  # q (B, H_q, L, D), k/v (B, H_kv, L, D), input_pos (L,)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        k_pos = torch.arange(self.k_cache.shape[2])
        mask = k_pos[None, :] <= input_pos[:, None]  # (L, S)
        if self.window:
            mask = mask & (input_pos[:, None] - k_pos[None, :] < self.window)
        kc = expand_kv(self.k_cache, self.n_rep, self.spelling)
        vc = expand_kv(self.v_cache, self.n_rep, self.spelling)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[None, None],
                                              enable_gqa=self.spelling == "enable_gqa")


@examples(6)
@given(B=st.sampled_from([1, 2]), H_kv=st.sampled_from([1, 2]), n_rep=st.sampled_from([1, 2, 4]),
       spelling=st.sampled_from(GQA_SPELLINGS), S=st.integers(4, 20), L=st.integers(1, 4),
       window=st.sampled_from([0, 3]), threshold=st.integers(0, 20), data=st.data())
def test_cache_steps_split_k_above_threshold_and_equal_aten(B, H_kv, n_rep, spelling, S, L, window, threshold, data):
    D = 8
    start = data.draw(st.integers(0, S - L), label="start position")
    ep = torch.export.export(Cache(B, H_kv, n_rep, S, D, window, spelling),
                             (torch.randn(B, H_kv * n_rep, L, D), torch.randn(B, H_kv, L, D),
                              torch.randn(B, H_kv, L, D), torch.arange(L)))
    new, rec = run_pass(ep, SDPADispatch(threshold=threshold), method="decode")
    splitk = S > threshold
    (site,) = rec.stats.sites
    assert (site["choice"], site["kv_buffer"], site["kv"]) == (
        "sdpa_decode_splitk" if splitk else "sdpa", "k_cache", (B, H_kv, S, D))
    assert site["reason"] == f"L_q={L}, L_kv={S} {'>' if splitk else '<='} threshold {threshold}"
    node = next(n for n in new.graph.nodes if n.target in (SPLITK, TILED))
    assert [a.target for a in node.args[1:3]] == [aten.index_copy.default] * 2  # the cache itself, not a copy

    g = torch.Generator().manual_seed(S * 31 + start)
    cache = torch.randn(2, B, H_kv, S, D, generator=g)  # earlier steps' K and V
    step = (torch.randn(B, H_kv * n_rep, L, D, generator=g), torch.randn(B, H_kv, L, D, generator=g),
            torch.randn(B, H_kv, L, D, generator=g), torch.arange(start, start + L))
    outs = []
    for program in (ep, new):
        m = program.module()
        m.k_cache.copy_(cache[0])
        m.v_cache.copy_(cache[1])
        outs.append(m(*step))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # CPU reference impls: exact
    k_all, v_all = cache.clone()
    k_all[:, :, start:start + L], v_all[:, :, start:start + L] = step[1], step[2]
    pos, k_pos = step[3], torch.arange(S)
    keep = (k_pos[None, :] <= pos[:, None]) & ((pos[:, None] - k_pos[None, :] < window) if window else True)
    want = attention_fp64(step[0], k_all, v_all, mask=keep)
    assert ((outs[1].double() - want).abs() <= 1e-5 * (1 + want.abs())).all()


# Sites the pass must leave alone, each with the exact reason it reports.
LEAVE_ALONE = ["dropout", "float64", "head dim > 512", "tiled heads", "cast K/V", "V head dim differs"]


class Unsupported(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        if self.kind == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        if self.kind == "tiled heads":  # h -> h % H_kv: not the repeat_kv order
            b, h, s, d = k.shape
            k, v = (x[:, None].expand(b, 2, h, s, d).reshape(b, 2 * h, s, d) for x in (k, v))
        if self.kind == "cast K/V":  # a bf16 cache read as fp32
            k, v = k.float(), v.float()
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("kind", LEAVE_ALONE)
@examples(2)
@given(B=st.sampled_from([1, 2]), H=st.sampled_from([1, 2]),
       L=st.integers(1, 5), S=st.integers(1, 12))
def test_unsupported_sites_are_left_alone_with_their_reason(kind, B, H, L, S):
    D, Dv, h_q = 8, 8, H
    dq = dkv = torch.float32
    if kind == "float64":
        dq = dkv = torch.float64
    elif kind == "head dim > 512":
        D = Dv = 520
    elif kind == "cast K/V":
        dkv = torch.bfloat16
    elif kind == "V head dim differs":
        Dv = 4
    elif kind == "tiled heads":
        h_q = 2 * H
    args = (torch.randn(B, h_q, L, D, dtype=dq), torch.randn(B, H, S, D, dtype=dkv),
            torch.randn(B, H, S, Dv, dtype=dkv))
    ep = torch.export.export(Unsupported(kind), args)
    reason = {
        "dropout": "dropout",
        "float64": "dtype torch.float64",
        "head dim > 512": "head dim 520 > 512",
        "tiled heads": "K/V expand not preceded by unsqueeze(2) (not the repeat_kv layout)",
        "cast K/V": "K/V cast between the cache and SDPA (source dtype differs from the query's)",
        "V head dim differs": f"k {(B, H, S, D)} and v {(B, H, S, Dv)} sources differ in shape",
    }[kind]
    new, rec = run_pass(ep, SDPADispatch(threshold=0))
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (False, 1, 0, {reason: 1})
    assert [s["choice"] for s in rec.stats.sites] == ["aten"]
    assert ops(new)[SDPA] == 1 and not ops(new)[SPLITK] and not ops(new)[TILED]
