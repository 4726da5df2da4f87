"""SDPADispatch sends speculative-verification steps (1 <= L_q <= 4, static) to split-K.

A one-layer cache model in the eager contract (index_copy_ into a full-length cache, repeat_kv,
bool (1, 1, L, S) mask k_pos <= q_pos) is exported at L = 1..5; the rewritten program must
call ``fxport::sdpa_decode_splitk`` for L <= 4 and the tiled kernel for L = 5, and equal the
original program on the CPU (its reference impl calls aten SDPA on the same mask: 1e-6).
"""

import pytest
import torch
import torch.nn.functional as F

import fxport.kernels.ops  # noqa: F401
from fxport.passes import graph as G
from fxport.passes.base import PassContext
from fxport.passes.sdpa_dispatch import SDPADispatch

SPLITK = torch.ops.fxport.sdpa_decode_splitk.default
TILED = torch.ops.fxport.sdpa.default


class CacheAttention(torch.nn.Module):
    def __init__(self, S=64, h_q=4, h_kv=2, d=8):
        super().__init__()
        self.h_q, self.h_kv = h_q, h_kv
        self.register_buffer("k_cache", torch.zeros(1, h_kv, S, d))
        self.register_buffer("v_cache", torch.zeros(1, h_kv, S, d))

    def forward(self, q, k, v, input_pos):  # q (1, H_q, L, D); k, v (1, H_kv, L, D); input_pos (L,)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        S, n = self.k_cache.shape[2], self.h_q // self.h_kv
        mask = (torch.arange(S)[None, :] <= input_pos[:, None])[None, None]  # (1, 1, L, S)
        b, h, s, d = self.k_cache.shape
        kx = self.k_cache[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        vx = self.v_cache[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        return F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask, scale=0.5)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5])
def test_verification_steps_use_splitk_and_match(L):
    m = CacheAttention()
    g = torch.Generator().manual_seed(L)
    args = (torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g),
            torch.randn(1, 2, L, 8, generator=g), torch.arange(30, 30 + L))
    ep = G.to_functional(torch.export.export(m, args))
    res = SDPADispatch(threshold=32)(ep, PassContext(method="decode"))
    targets = [n.target for n in res.ep.graph.nodes if n.op == "call_function"]
    want = SPLITK if L <= 4 else TILED
    assert targets.count(want) == 1 and targets.count(SPLITK if want is TILED else TILED) == 0
    site = res.stats.sites[0]
    assert site["reason"] == (f"L_q={L}, L_kv=64 > threshold 32" if L <= 4 else "L_q=5 > 4 (prefill)")
    # the cache already holds earlier keys: fill it, then run both programs on the same state
    cache = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    outs = []
    for prog in (ep, res.ep):
        mod = prog.module()
        mod.k_cache.copy_(cache[0])
        mod.v_cache.copy_(cache[1])
        outs.append(mod(*args))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
