"""RingBufferKVCache + SDPADispatch on a gpt-fast-style model (written here, gpt-fast's layout).

gpt-fast (pytorch-labs/gpt-fast) writes its cache with ``k_cache[:, :, input_pos] = k`` (an
``index_put_`` with a position tensor, as torchtune does), builds the mask as
``causal_mask[None, None, input_pos]`` and expands GQA heads with
``k.repeat_interleave(n_head // n_local_heads, dim=1)`` in front of
``F.scaled_dot_product_attention``. The same model also writes its cache the other common way,
``cache.narrow(2, start, L).copy_(k)`` with ``start = input_pos[0].item()`` (``slice_scatter`` at
a symbolic start in the exported graph). Layer 0 is a sliding layer (a banded mask buffer),
layer 1 global. Hypothesis draws heads, KV heads, head dim, window and prefill chunk.
Reference: the same exported programs without the passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch, apply
from fxport.tests.foreign import drive

VOCAB, DIM, S = 64, 32, 32


class KVCache(nn.Module):
    def __init__(self, n_heads: int, head_dim: int, write: str):
        super().__init__()
        self.write = write
        self.register_buffer("k_cache", torch.zeros(1, n_heads, S, head_dim))
        self.register_buffer("v_cache", torch.zeros(1, n_heads, S, head_dim))

    def update(self, input_pos, k, v):  # input_pos (L,), k/v (1, H_kv, L, D)
        k_out, v_out = self.k_cache, self.v_cache
        if self.write == "index_put":  # gpt-fast
            k_out[:, :, input_pos] = k
            v_out[:, :, input_pos] = v
        else:  # a contiguous slice at a data-dependent start: slice_scatter in the exported graph
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + k.shape[2] <= S)
            k_out.narrow(2, start, k.shape[2]).copy_(k)
            v_out.narrow(2, start, v.shape[2]).copy_(v)
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, n_head: int, n_local_heads: int, head_dim: int, write: str):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, head_dim
        self.wqkv = nn.Linear(DIM, (n_head + 2 * n_local_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, DIM, bias=False)
        self.kv_cache = KVCache(n_local_heads, head_dim, write)

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs_cis)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bsz, n_head, seqlen, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


def apply_rotary_emb(x, freqs_cis):  # x (bsz, seqlen, heads, head_dim), freqs_cis (seqlen, head_dim // 2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, n_head, n_local_heads, head_dim, write):
        super().__init__()
        self.attention = Attention(n_head, n_local_heads, head_dim, write)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM, eps=1e-5), nn.RMSNorm(DIM, eps=1e-5)
        self.w1, self.w3, self.w2 = nn.Linear(DIM, 64, bias=False), nn.Linear(DIM, 64, bias=False), nn.Linear(64, DIM, bias=False)

    def forward(self, x, freqs_cis, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Transformer(nn.Module):
    """Two layers: 0 sliding (window ``window``), 1 global."""

    def __init__(self, n_head: int, n_local_heads: int, head_dim: int, window: int, write: str = "index_put"):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(n_head, n_local_heads, head_dim, write) for _ in range(2))
        self.norm, self.output = nn.RMSNorm(DIM, eps=1e-5), nn.Linear(DIM, VOCAB, bias=False)
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("sliding_mask", causal & ~torch.tril(causal, -window), persistent=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(S).float(), freqs)
        self.register_buffer("freqs_cis", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)

    def forward(self, idx, input_pos):  # idx (1, L), input_pos (L,)
        freqs_cis = self.freqs_cis[input_pos]
        masks = (self.sliding_mask[None, None, input_pos], self.causal_mask[None, None, input_pos])
        x = self.tok_embeddings(idx)
        for layer, mask in zip(self.layers, masks):
            x = layer(x, freqs_cis, mask, input_pos)
        return self.output(self.norm(x))


def export(model, chunk: int) -> dict:
    L = Dim("L", min=1, max=chunk)
    with torch.no_grad():
        prefill = torch.export.export(model, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                      dynamic_shapes=({1: L}, {0: L}), strict=False)
        decode = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.arange(1)), strict=False)
    return {"prefill": prefill, "decode": decode}


def feed(method, tokens, start):
    return (tokens, torch.arange(start, start + tokens.shape[1])), {}


@pytest.mark.parametrize("write", ["index_put", "narrow_copy"])
@settings(max_examples=2, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # no shrinking: each example exports twice
@given(
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3), (8, 2)]),  # (n_head, n_local_heads)
    head_dim=st.sampled_from([4, 8, 16]),
    window=st.integers(2, 6),
    chunk=st.integers(2, 9),
    data=st.data(),
)
def test_cache_write_forms_ring_and_splitk(write, heads, head_dim, window, chunk, data):
    n_head, n_kv = heads
    chunks = data.draw(st.lists(st.integers(1, chunk), min_size=1, max_size=3), label="chunks")
    torch.manual_seed(0)
    model = Transformer(n_head, n_kv, head_dim, window, write).eval()
    reference = {m: drive.normalized(ep) for m, ep in export(model, chunk).items()}
    sliding = [f"layers.0.attention.kv_cache.{kv}_cache" for kv in ("k", "v")]
    full = [f"layers.1.attention.kv_cache.{kv}_cache" for kv in ("k", "v")]
    passes = [RingBufferKVCache({n: window for n in sliding}), SDPADispatch(threshold=0)]
    results = {m: apply(ep, passes, method=m, dump=False) for m, ep in reference.items()}

    r = drive.ring_size(window, chunk)
    for method, res in results.items():
        ring = res["ring_buffer_kv_cache"].stats
        assert (ring.matched, ring.rewritten, dict(ring.skipped)) == (2, 2, {}), (method, res.summary())
        assert [(site["write"], site["readers"]) for site in ring.sites] == \
            [({"index_put": "index_put", "narrow_copy": "slice_scatter"}[write], ["repeat_interleave"])] * 2
        assert drive.cache_lengths(res.ep, sliding + full) == {**dict.fromkeys(sliding, r), **dict.fromkeys(full, S)}
        assert drive.aten_sdpa_left(res.ep) == 0, method
    decode = results["decode"].ep
    assert drive.splitk_reads(decode, sliding + full) == [
        {"q": (1, n_head, 1, head_dim), "k": (1, n_kv, length, head_dim), "v": (1, n_kv, length, head_dim),
         "k_cache": names[0], "v_cache": names[1]}
        for names, length in ((sliding, r), (full, S))
    ]
    assert drive.kv_expansions(decode, sliding + full) == []

    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    expected = drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, chunks)
    with torch.no_grad():  # the unrewritten programs equal the eager model run once over all S tokens
        for layer in model.layers:
            layer.attention.kv_cache.k_cache.zero_(), layer.attention.kv_cache.v_cache.zero_()
        eager = model(tokens, torch.arange(S))
    torch.testing.assert_close(torch.cat(expected, 1), eager, rtol=1e-5, atol=1e-5)
