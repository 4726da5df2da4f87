"""AdditiveAttentionMask on drawn chains of SDPA sites: each site reads one of two bool masks
(drawn shapes), a float mask or none, by position or keyword, in float32 or bfloat16.

Expected from the contract: every site is matched, the bool-mask sites are rewritten, the others
skipped as "no bool mask", and there is one ``masked_fill`` per distinct bool mask, read by every
site of that mask. Every query row sees a key, so the rewritten program equals the unrewritten
one within float rounding and an fp64 attention written without SDPA within the dtype's
tolerance; a second run rewrites nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxport.passes import AdditiveAttentionMask

from fxport.tests.passes.hypothesis_helpers import additive, assert_idempotent, attention_fp64, examples, keep_mask, ops, run_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
#: (vs the unrewritten program, vs fp64 as TOL * (1 + |fp64|))
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-2, 5e-2)}


class Chain(nn.Module):
    """SDPA sites in a row, each reading the previous output as its query."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan  # [(mask name, by keyword)]

    def forward(self, q, k, v, bool0, bool1, floats):  # q (B, H, L, D), k/v (B, H, S, D)
        masks = {"none": None, "bool0": bool0, "bool1": bool1, "float": floats}
        x = q
        for name, keyword in self.plan:
            x = (F.scaled_dot_product_attention(x, k, v, attn_mask=masks[name]) if keyword
                 else F.scaled_dot_product_attention(x, k, v, masks[name]))
        return x


@examples(8)
@given(B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]), L=st.integers(1, 5), S=st.integers(1, 9),
       D=st.sampled_from([4, 8]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       plan=st.lists(st.tuples(st.sampled_from(["none", "bool0", "bool1", "float"]), st.booleans()),
                     min_size=1, max_size=4),
       shapes=st.lists(st.sampled_from(["(L,S)", "(1,1,L,S)", "(B,1,L,S)", "(B,H,L,S)"]), min_size=2, max_size=2),
       seed=st.integers(0, 2**16))
def test_bool_masks_become_one_shared_additive_mask_each(B, H, L, S, D, dtype, plan, shapes, seed):
    dims = {"(L,S)": (L, S), "(1,1,L,S)": (1, 1, L, S), "(B,1,L,S)": (B, 1, L, S), "(B,H,L,S)": (B, H, L, S)}
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (L, S, S))
    bool0, bool1 = keep_mask(dims[shapes[0]], seed), keep_mask(dims[shapes[1]], seed + 1)  # key 0 always seen
    floats = additive(keep_mask((B, 1, L, S), seed + 2), dtype)
    args = (q, k, v, bool0, bool1, floats)
    ep = torch.export.export(Chain(plan), args)
    new, rec = run_pass(ep, AdditiveAttentionMask())

    bool_sites = [name for name, _ in plan if name.startswith("bool")]
    others = len(plan) - len(bool_sites)
    assert (rec.stats.matched, rec.stats.rewritten) == (len(plan), len(bool_sites))
    assert dict(rec.stats.skipped) == ({"no bool mask": others} if others else {})
    fills = [n for n in new.graph.nodes if n.target is aten.masked_fill.Scalar]
    assert len(fills) == len(set(bool_sites))  # one additive mask per distinct bool mask
    for fill in fills:  # zeros_like(mask, q.dtype) filled with -inf where the bool mask hides
        assert fill.args[2] == float("-inf") and fill.meta["val"].dtype == dtype
    sdpas = [n for n in new.graph.nodes if n.target is SDPA]
    read = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in sdpas]
    for (name, _), mask in zip(plan, read):
        if name.startswith("bool"):
            assert mask in fills
            assert mask.args[0].args[0].name == name  # zeros_like(the bool mask input)
    assert len({m for (name, _), m in zip(plan, read) if name == "bool0"}) <= 1  # shared, not one per site
    assert ops(new)[aten.logical_not.default] == len(set(bool_sites))

    got = new.module()(*args)
    close, tol = TOL[dtype]
    torch.testing.assert_close(got, ep.module()(*args), rtol=close, atol=close)  # -inf added instead of selected
    want = q
    for name, _ in plan:
        mask = {"none": None, "bool0": bool0, "bool1": bool1, "float": floats}[name]
        want = attention_fp64(want.to(dtype) if dtype == torch.bfloat16 else want, k, v, mask=mask)
    assert ((got.double() - want).abs() <= tol * (1 + want.abs())).all()
    assert_idempotent(new, AdditiveAttentionMask())
