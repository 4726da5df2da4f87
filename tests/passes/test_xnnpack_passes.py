"""The XNNPACK rewrites (fxport.passes.xnnpack), one section per pass.

Each pass runs on small exported modules (functional ATen IR, as the pipeline hands them);
the tests assert the rewritten program's numbers against the unrewritten one's (tolerance next
to each assertion), the exact structure produced, the skip reasons, and idempotence.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, export

from fxport.passes.xnnpack import (
    AdditiveAttentionMask,
    RMSNormAsLinear,
    RotateHalfAsLinear,
    SDPAAsMatmul,
    SymbolicViewAsInferred,
)
from fxport.passes.xnnpack.rotate_half_as_linear import rotation

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
H_Q, H_KV, D, S = 4, 2, 8, 12


def _export(module, args, dynamic_shapes=None):
    return export(module, args, dynamic_shapes=dynamic_shapes).run_decompositions({})


def _targets(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _twice(pass_, ep):
    """(first result, second result on the first's output)."""
    once = pass_(ep)
    return once, pass_(once.ep)


def _repeat_kv(t, n):
    b, h, s, d = t.shape
    return t[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


# ------------------------------------------------------------------------ AdditiveAttentionMask


class BoolMasks(nn.Module):
    """Two SDPA calls share one bool mask; a third has none."""

    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b = F.scaled_dot_product_attention(a, k, v, mask)  # positional mask
        return F.scaled_dot_product_attention(b, k, v)


def test_additive_attention_mask_one_shared_float_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H_Q, 3, D, generator=g) for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]  # every row sees itself
    ep = _export(BoolMasks(), (q, k, v, mask))
    once, twice = _twice(AdditiveAttentionMask(), ep)
    assert (once.stats.matched, once.stats.rewritten, dict(once.stats.skipped)) == (3, 2, {"no bool mask": 1})
    fills = [n for n in once.ep.graph.nodes if n.target is aten.masked_fill.Scalar]
    sdpas = [n for n in once.ep.graph.nodes if n.target is SDPA]
    assert len(fills) == 1
    assert [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in sdpas] == [fills[0], fills[0], None]
    # -inf added instead of a bool select: equal up to float rounding for rows that see a key
    torch.testing.assert_close(once.ep.module()(q, k, v, mask), ep.module()(q, k, v, mask), rtol=1e-6, atol=1e-6)
    assert not twice.changed and dict(twice.stats.skipped) == {"no bool mask": 3}


# ------------------------------------------------------------------------ SDPAAsMatmul


class Decode(nn.Module):
    """L = 1 sites: each GQA spelling with a float (1, 1, 1, S) mask; MHA; a bool mask; causal."""

    def forward(self, q, k, v, fmask, bmask):
        n = H_Q // H_KV
        outs = [
            F.scaled_dot_product_attention(q, k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1),
                                           attn_mask=fmask),
            F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), attn_mask=fmask, scale=0.3),
            F.scaled_dot_product_attention(q, k, v, attn_mask=fmask, enable_gqa=True),
            F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), attn_mask=bmask),
            F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), is_causal=True),
        ]
        return torch.stack(outs)


class Prefill(nn.Module):
    """Dynamic L: repeat_kv and enable_gqa with a (1, 1, L, S) mask; MHA with a (1, H, L, S) mask."""

    def forward(self, q, k, v, fmask, hmask):
        n = H_Q // H_KV
        return torch.stack([
            F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), attn_mask=fmask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=fmask, enable_gqa=True),
            F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), attn_mask=hmask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=hmask, enable_gqa=True),
        ])


def _float_mask(L, heads=1, seed=0):
    """Additive mask: -inf on a random half of the keys, never on key 0 (every row sees a key)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(1, heads, L, S, generator=g) < 0.5
    hidden[..., 0] = False
    return torch.zeros(1, heads, L, S).masked_fill(hidden, float("-inf"))


@functools.lru_cache(maxsize=None)
def _decode():
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, H_Q, 1, D, generator=g), torch.randn(1, H_KV, S, D, generator=g),
            torch.randn(1, H_KV, S, D, generator=g), _float_mask(1), _float_mask(1) == 0)
    return _export(Decode(), args), args


def test_sdpa_as_matmul_decode_folds_every_gqa_spelling():
    ep, args = _decode()
    once, twice = _twice(SDPAAsMatmul(), ep)
    st = once.stats
    assert (st.matched, st.rewritten) == (5, 3)
    assert dict(st.skipped) == {"bool mask (run AdditiveAttentionMask first)": 1, "dropout or causal": 1}
    assert [(s["gqa"], s["gqa_folded"], s["n_rep"]) for s in st.sites] == [
        ("repeat_interleave", True, 2), ("repeat_kv", True, 2), ("enable_gqa", True, 2)]
    # folded sites multiply the (1*H_kv, S, D) cache: three bmm pairs, no repeat_interleave left
    targets = _targets(once.ep)
    assert targets.count(aten.bmm.default) == 6 and aten.repeat_interleave.self_int not in targets
    assert targets.count(SDPA) == 2  # the two skipped sites
    torch.testing.assert_close(once.ep.module()(*args), ep.module()(*args), rtol=1e-5, atol=1e-6)  # fp32 order
    assert not twice.changed and twice.stats.matched == 2


def test_sdpa_as_matmul_prefill_folds_with_a_broadcast_mask_only():
    L, Ld = 5, Dim("L", min=2, max=8)
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(1, H_Q, L, D, generator=g), torch.randn(1, H_KV, S, D, generator=g),
            torch.randn(1, H_KV, S, D, generator=g), _float_mask(L, seed=3), _float_mask(L, H_Q, seed=4))
    ep = _export(Prefill(), args, ({2: Ld}, None, None, {2: Ld}, {2: Ld}))
    once, twice = _twice(SDPAAsMatmul(), ep)
    st = once.stats
    assert (st.matched, st.rewritten) == (4, 3)
    assert dict(st.skipped) == {"enable_gqa with a mask that does not fold over the K/V heads": 1}
    assert [(s["gqa"], s["gqa_folded"]) for s in st.sites] == [("repeat_kv", True), ("enable_gqa", True),
                                                               ("repeat_kv", False)]
    torch.testing.assert_close(once.ep.module()(*args), ep.module()(*args), rtol=1e-5, atol=1e-6)
    assert not twice.changed


# ------------------------------------------------------------------------ RMSNormAsLinear


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        a = F.rms_norm(x, [D], self.w + 1.0, 1e-6)  # Gemma's (1 + w), folded into a constant
        b = F.rms_norm(a, [D], eps=1e-5)  # no weight
        return F.rms_norm(b, [3, D], eps=1e-6)  # two normalized dims: left alone


def test_rms_norm_as_linear():
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(5))
    ep = _export(Norms(), (x,))
    once, twice = _twice(RMSNormAsLinear(), ep)
    st = once.stats
    assert (st.matched, st.rewritten, dict(st.skipped)) == (
        3, 2, {"not fp32 or normalized over more than one dim": 1})
    assert [(s["dim"], s["weight"]) for s in st.sites] == [(D, "folded"), (D, "as is")]
    means = {k: v for k, v in once.ep.constants.items() if k.startswith("fxport_rms_mean.")}
    assert len(means) == 2 and all(torch.equal(v, torch.full((1, D), 1 / D)) for v in means.values())
    assert torch.equal(once.ep.constants["w_plus_1"], ep.state_dict["w"] + 1)
    assert _targets(once.ep).count(aten.rms_norm.default) == 1 and aten.linear.default in _targets(once.ep)
    torch.testing.assert_close(once.ep.module()(x), ep.module()(x), rtol=1e-6, atol=1e-6)  # mean as a dot product
    assert not twice.changed and dict(twice.stats.skipped) == {"not fp32 or normalized over more than one dim": 1}


# ------------------------------------------------------------------------ SymbolicViewAsInferred


class Views(nn.Module):
    def forward(self, x):  # (B, L, 8) with B and L dynamic
        B, L, _ = x.shape
        a = x.view(1, B * L, 2, 4)  # one symbolic size
        b = (x * 2).reshape(B * L, 8)  # exported as a view
        c = x.view(B, L, 2, 4)  # two symbolic sizes: left alone
        return a.sum() + b.sum() + c.sum()


def test_symbolic_view_as_inferred():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(6))
    ep = _export(Views(), (x,), ({0: Dim("B", min=2, max=4), 1: Dim("L", min=2, max=8)},))
    once, twice = _twice(SymbolicViewAsInferred(), ep)
    st = once.stats
    assert (st.matched, st.rewritten, dict(st.skipped)) == (3, 2, {"several symbolic or inferred dims": 1})
    views = [[d if isinstance(d, int) else "sym" for d in n.args[1]]
             for n in once.ep.graph.nodes if n.target is aten.view.default]
    assert views == [[1, -1, 2, 4], [-1, 8], ["sym", "sym", 2, 4]]
    for shape in ((2, 3, 8), (4, 7, 8)):
        y = torch.randn(*shape)
        torch.testing.assert_close(once.ep.module()(y), ep.module()(y), rtol=0, atol=0)  # same values, same order
    assert not twice.changed and dict(twice.stats.skipped) == {"several symbolic or inferred dims": 1}


# ------------------------------------------------------------------------ RotateHalfAsLinear


class Rotate(nn.Module):
    def forward(self, x, odd):
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)  # rotate_half
        swap = torch.cat((x[..., h:], x[..., :h]), dim=-1)  # no neg: another cat
        o = odd.shape[-1] // 2
        rot_odd = torch.cat((-odd[..., o:], odd[..., :o]), dim=-1)  # D = 5: left alone
        return rot + swap, rot_odd


def test_rotate_half_as_linear():
    g = torch.Generator().manual_seed(7)
    x, odd = torch.randn(1, 2, 3, D, generator=g), torch.randn(1, 3, 5, generator=g)
    Ld = Dim("L", min=2, max=8)
    ep = _export(Rotate(), (x, odd), ({2: Ld}, None))
    once, twice = _twice(RotateHalfAsLinear(), ep)
    st = once.stats
    assert (st.matched, st.rewritten, dict(st.skipped)) == (2, 1, {"not fp32 or last dim odd / dynamic": 1})
    (name, weight), = ((k, v) for k, v in once.ep.constants.items() if k.startswith("fxport_rotate_half."))
    assert torch.equal(weight, rotation(D))
    assert _targets(once.ep).count(aten.cat.default) == 2 and aten.linear.default in _targets(once.ep)
    y = torch.randn(1, 2, 6, D, generator=g)
    for got, want in zip(once.ep.module()(y, odd), ep.module()(y, odd)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # +-1 times one input, plus zeros: exact
    assert not twice.changed and twice.stats.matched == 1


def test_rotation_matrix_is_rotate_half():
    x = torch.randn(3, 6)
    assert torch.equal(F.linear(x, rotation(6)), torch.cat((-x[:, 3:], x[:, :3]), dim=-1))


@pytest.mark.parametrize("cls", [AdditiveAttentionMask, RMSNormAsLinear, RotateHalfAsLinear, SDPAAsMatmul,
                                 SymbolicViewAsInferred])
def test_contract_docstring(cls):
    import sys

    doc = sys.modules[cls.__module__].__doc__
    assert all(word in doc for word in ("Matches", "Produces", "Leaves alone", "Invariant")), cls
