"""ExecuTorch's own Llama example, exported as ``export_llama`` does, then fxport's passes.

The model is ``executorch.examples.models.llama`` from the executorch wheel (random weights):
``construct_transformer(ModelArgs(use_kv_cache=True, enable_dynamic_shape=True))``; its GQA is
``k.repeat_interleave(n_rep, dim=1)`` in front of ``F.scaled_dot_product_attention``. Even
layers are made sliding-window layers by giving them a banded mask (the example keeps a causal
mask buffer per layer). Two methods are exported, prefill (dynamic length up to ``--chunk``)
and decode (one token), and each goes through

    RingBufferKVCache: sliding caches shrink from the context length to R slots;
    SDPADispatch: decode attention becomes the split-K kernel reading the un-expanded cache.

    .venv/bin/python examples/executorch_llama.py [--layers 2 --context 64 --window 8 --chunk 16]
"""

from __future__ import annotations

import argparse

import torch
from executorch.examples.models.llama.llama_transformer import construct_transformer
from executorch.examples.models.llama.model_args import ModelArgs
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch

from _report import apply_and_report  # examples/_report.py: prints what changed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=64, help="max_context_len: the full cache length")
    p.add_argument("--window", type=int, default=8, help="sliding window of the even layers")
    p.add_argument("--chunk", type=int, default=16, help="largest prefill chunk the program accepts")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model_args = ModelArgs(
        dim=64, n_layers=args.layers, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=128,
        max_seq_len=args.context, max_context_len=args.context, use_kv_cache=True, enable_dynamic_shape=True,
    )
    model = construct_transformer(model_args).eval()
    causal = torch.tril(torch.ones(args.context, args.context, dtype=torch.bool))
    sliding = range(0, args.layers, 2)
    for i in sliding:  # keys p - W + 1 .. p
        model.layers[i].attention.mask.copy_(causal & ~torch.tril(causal, -args.window))

    # As export_llama: tokens (1, L) with a dynamic L, attention options {"input_pos": tensor([start])}.
    pos = {"input_pos": torch.tensor([0])}
    with torch.no_grad():
        methods = {
            "prefill": torch.export.export(
                model, (torch.zeros(1, 2, dtype=torch.long), pos),
                dynamic_shapes=({1: Dim("L", min=1, max=args.chunk)}, {"input_pos": None}), strict=False),
            "decode": torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), pos), strict=False),
        }

    windows = {f"layers.{i}.attention.kv_cache.{kv}_cache": args.window for i in sliding for kv in ("k", "v")}
    passes = [RingBufferKVCache(windows), SDPADispatch(threshold=0)]  # threshold 0: split-K at any cache length
    print(f"ExecuTorch Llama example: {args.layers} layers, 4 query heads on 2 KV heads, context {args.context}, "
          f"window {args.window} on layers {list(sliding)}, prefill chunks up to {args.chunk}")
    apply_and_report(methods, passes)


if __name__ == "__main__":
    main()
