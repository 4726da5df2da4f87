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
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch

from _report import apply_and_report  # examples/_report.py: prints what changed

VOCAB, DIM, N_HEAD, N_LOCAL_HEADS, HEAD_DIM = 128, 64, 4, 2, 16


class KVCache(nn.Module):
    def __init__(self, max_seq_length: int):
        super().__init__()
        shape = (1, N_LOCAL_HEADS, max_seq_length, HEAD_DIM)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def update(self, input_pos, k_val, v_val):  # input_pos (L,), k_val (1, H_kv, L, D)
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, max_seq_length: int):
        super().__init__()
        self.wqkv = nn.Linear(DIM, (N_HEAD + 2 * N_LOCAL_HEADS) * HEAD_DIM, bias=False)
        self.wo = nn.Linear(N_HEAD * HEAD_DIM, DIM, bias=False)
        self.kv_cache = KVCache(max_seq_length)

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = N_LOCAL_HEADS * HEAD_DIM
        q, k, v = self.wqkv(x).split([N_HEAD * HEAD_DIM, kv_size, kv_size], dim=-1)
        q = rope(q.view(bsz, seqlen, N_HEAD, HEAD_DIM), freqs_cis)
        k = rope(k.view(bsz, seqlen, N_LOCAL_HEADS, HEAD_DIM), freqs_cis)
        v = v.view(bsz, seqlen, N_LOCAL_HEADS, HEAD_DIM)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (bsz, heads, seqlen, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(N_HEAD // N_LOCAL_HEADS, dim=1)
        v = v.repeat_interleave(N_HEAD // N_LOCAL_HEADS, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


def rope(x, freqs_cis):  # x (bsz, seqlen, heads, head_dim), freqs_cis (seqlen, head_dim // 2, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, max_seq_length: int):
        super().__init__()
        self.attention = Attention(max_seq_length)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM, eps=1e-5), nn.RMSNorm(DIM, eps=1e-5)
        self.w1, self.w3 = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x, freqs_cis, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Transformer(nn.Module):
    def __init__(self, n_layer: int, max_seq_length: int, window: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(max_seq_length) for _ in range(n_layer))
        self.norm, self.output = nn.RMSNorm(DIM, eps=1e-5), nn.Linear(DIM, VOCAB, bias=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("sliding_mask", causal & ~torch.tril(causal, -window), persistent=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        angles = torch.outer(torch.arange(max_seq_length).float(), freqs)
        self.register_buffer("freqs_cis", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)

    def forward(self, idx, input_pos):  # idx (1, L), input_pos (L,)
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            mask = (self.sliding_mask if i % 2 == 0 else self.causal_mask)[None, None, input_pos]
            x = layer(x, freqs_cis, mask, input_pos)
        return self.output(self.norm(x))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=64, help="max_seq_length: the full cache length")
    p.add_argument("--window", type=int, default=8, help="sliding window of the even layers")
    p.add_argument("--chunk", type=int, default=16, help="largest prefill chunk the program accepts")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = Transformer(args.layers, args.context, args.window).eval()
    with torch.no_grad():
        methods = {
            "prefill": torch.export.export(model, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                           dynamic_shapes=({1: Dim("L", min=1, max=args.chunk)}, {0: Dim("L", min=1, max=args.chunk)})),
            "decode": torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.arange(1))),
        }

    sliding = range(0, args.layers, 2)
    windows = {f"layers.{i}.attention.kv_cache.{kv}_cache": args.window for i in sliding for kv in ("k", "v")}
    passes = [RingBufferKVCache(windows), SDPADispatch(threshold=0)]  # threshold 0: split-K at any cache length
    print(f"gpt-fast-style model: {args.layers} layers, {N_HEAD} query heads on {N_LOCAL_HEADS} KV heads, "
          f"context {args.context}, window {args.window} on layers {list(sliding)}, prefill chunks up to {args.chunk}")
    apply_and_report(methods, passes)


if __name__ == "__main__":
    main()
