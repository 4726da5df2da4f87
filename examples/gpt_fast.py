"""A gpt-fast-style model (pytorch-labs/gpt-fast's layout), exported with torch.export, then fxport's passes.

gpt-fast keeps its KV cache as a module with two buffers written by
``k_cache[:, :, input_pos] = k`` (``index_put_`` with a position tensor, as torchtune does),
masks with ``causal_mask[None, None, input_pos]`` and expands GQA heads with
``repeat_interleave`` before ``F.scaled_dot_product_attention``. Here even layers have a banded
(sliding-window) mask. Prefill (dynamic length up to ``--chunk``) and decode (one token) are
exported with plain ``torch.export.export``, then

    RingBufferKVCache: the sliding layers' caches shrink to R slots, writes at ``pos % R``;
    SDPADispatch: decode attention becomes the split-K kernel on the un-expanded cache.

    .venv/bin/python examples/gpt_fast.py [--layers 2 --context 64 --window 8 --chunk 16]

The model (``ModelArgs``, ``Transformer``) is also what tests/foreign/test_gpt_fast.py rewrites,
with both cache writes (``ModelArgs.cache_write``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch

@dataclass
class ModelArgs:
    """The model's sizes (gpt-fast's ``ModelArgs``, trimmed to what this file uses)."""

    n_layer: int = 2
    max_seq_length: int = 64  # the full cache length
    window: int = 8  # sliding window of the even layers (odd layers are global)
    vocab_size: int = 128
    dim: int = 64
    n_head: int = 4
    n_local_heads: int = 2  # KV heads
    head_dim: int = 16
    # "index_put": gpt-fast's ``k_cache[:, :, input_pos] = k``; "narrow_copy": the other common
    # write, ``cache.narrow(2, input_pos[0].item(), L).copy_(k)`` (slice_scatter at a symbolic start)
    cache_write: str = "index_put"


class KVCache(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.write = args.cache_write
        shape = (1, args.n_local_heads, args.max_seq_length, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def update(self, input_pos, k_val, v_val):  # input_pos (L,), k_val (1, H_kv, L, D)
        k_out, v_out = self.k_cache, self.v_cache
        if self.write == "index_put":
            k_out[:, :, input_pos] = k_val
            v_out[:, :, input_pos] = v_val
        else:  # a contiguous slice at a data-dependent start
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + k_val.shape[2] <= k_out.shape[2])
            k_out.narrow(2, start, k_val.shape[2]).copy_(k_val)
            v_out.narrow(2, start, v_val.shape[2]).copy_(v_val)
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_local_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache = KVCache(args)

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = rope(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = rope(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs_cis)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bsz, heads, seqlen, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


def rope(x, freqs_cis):  # x (bsz, seqlen, heads, head_dim), freqs_cis (seqlen, head_dim // 2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(args.dim, eps=1e-5), nn.RMSNorm(args.dim, eps=1e-5)
        self.w1, self.w3 = nn.Linear(args.dim, 2 * args.dim, bias=False), nn.Linear(args.dim, 2 * args.dim, bias=False)
        self.w2 = nn.Linear(2 * args.dim, args.dim, bias=False)

    def forward(self, x, freqs_cis, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm, self.output = nn.RMSNorm(args.dim, eps=1e-5), nn.Linear(args.dim, args.vocab_size, bias=False)
        S = args.max_seq_length
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("sliding_mask", causal & ~torch.tril(causal, -args.window), persistent=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        angles = torch.outer(torch.arange(S).float(), freqs)
        self.register_buffer("freqs_cis", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)

    def forward(self, idx, input_pos):  # idx (1, L), input_pos (L,) -> logits (1, L, vocab_size)
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            mask = (self.sliding_mask if i % 2 == 0 else self.causal_mask)[None, None, input_pos]
            x = layer(x, freqs_cis, mask, input_pos)
        return self.output(self.norm(x))

    def sliding_caches(self) -> list[str]:
        """The cache buffers of the sliding (even) layers."""
        return [f"layers.{i}.attention.kv_cache.{kv}_cache" for i in range(0, self.args.n_layer, 2) for kv in ("k", "v")]


def main(argv=None) -> None:
    from _report import apply_and_report  # examples/_report.py, beside this script: prints what changed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=64, help="max_seq_length: the full cache length")
    p.add_argument("--window", type=int, default=8, help="sliding window of the even layers")
    p.add_argument("--chunk", type=int, default=16, help="largest prefill chunk the program accepts")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = Transformer(ModelArgs(n_layer=args.layers, max_seq_length=args.context, window=args.window)).eval()
    with torch.no_grad():
        methods = {
            "prefill": torch.export.export(model, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                           dynamic_shapes=({1: Dim("L", min=1, max=args.chunk)}, {0: Dim("L", min=1, max=args.chunk)})),
            "decode": torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.arange(1))),
        }

    a = model.args
    passes = [RingBufferKVCache(dict.fromkeys(model.sliding_caches(), args.window)),
              SDPADispatch(threshold=0)]  # threshold 0: split-K at any cache length
    print(f"gpt-fast-style model: {args.layers} layers, {a.n_head} query heads on {a.n_local_heads} KV heads, "
          f"context {args.context}, window {args.window} on layers {list(range(0, args.layers, 2))}, "
          f"prefill chunks up to {args.chunk}")
    apply_and_report(methods, passes)


if __name__ == "__main__":
    main()
