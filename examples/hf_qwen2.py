"""transformers' Qwen2, exported by transformers' own ExecuTorch recipe, then fxport's passes.

A random Qwen2 (``use_sliding_window=True``: layers from ``max_window_layers`` on are sliding)
goes through ``transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM``,
which registers a full-length static cache per layer (``key_cache_{i}`` / ``value_cache_{i}``,
sliding layers included) and exports with ``torch.export`` (strict, transformers' default).
Then:

    RingBufferKVCache: the sliding layers' caches shrink from the cache length to R slots;
    SDPADispatch: decode attention becomes the split-K kernel, reading the cache's KV heads
        directly (transformers' ``repeat_kv`` expansion is peeled off).

    .venv/bin/python examples/hf_qwen2.py [--layers 4 --cache 128 --window 16 --chunk 32]
"""

from __future__ import annotations

import argparse

import torch
from torch.export import Dim
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

from fxport.passes import RingBufferKVCache, SDPADispatch

from _report import apply_and_report  # examples/_report.py: prints what changed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cache", type=int, default=128, help="max_cache_len of the static cache")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--chunk", type=int, default=32, help="largest prefill chunk the program accepts")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.cache,
        use_sliding_window=True, sliding_window=args.window, max_window_layers=args.layers // 2,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.cache_implementation = "static"
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=args.cache)
    L = Dim("L", min=1, max=args.chunk)
    with torch.no_grad():
        methods = {
            "prefill": exportable.export(input_ids=torch.zeros(1, 2, dtype=torch.long), cache_position=torch.arange(2),
                                         dynamic_shapes={"input_ids": {1: L}, "cache_position": {0: L}}),
            "decode": exportable.export(input_ids=torch.zeros(1, 1, dtype=torch.long), cache_position=torch.arange(1)),
        }

    sliding = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    windows = {f"{kv}_cache_{i}": args.window for i in sliding for kv in ("key", "value")}
    passes = [RingBufferKVCache(windows), SDPADispatch(threshold=0)]  # threshold 0: split-K at any cache length
    print(f"transformers Qwen2: {args.layers} layers ({len(sliding)} sliding, window {args.window}), "
          f"4 query heads on 2 KV heads, static cache {args.cache}, prefill chunks up to {args.chunk}")
    apply_and_report(methods, passes)


if __name__ == "__main__":
    main()
