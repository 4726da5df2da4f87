"""Eager CPU benchmark: fxport's eager Gemma vs transformers' eager Gemma3ForCausalLM.

Same weights (the Gemma 3 270M Q4_K_M GGUF dequantized to fp32 by each library's own loader;
tests/models/test_real_weights.py checks they are bit-identical), same thread count
(``torch.set_num_threads(2)``), side by side in one process with interleaved repetitions.

Prefill: one forward over a 128-token prompt from an empty cache (both return logits for all
128 positions). Decode: ``--decode`` single-token forwards after that prompt, greedy, KV cache
(fxport: static cache buffers; transformers: its default cache). Reported: median over ``--reps``
repetitions, tokens per second. Ceiling for fp32 decode on this machine: ~26 GB/s read / 1.07
GB of fp32 weights per token ~ 25 tok/s (DESIGN.md).

Run: ``.venv/bin/python bench/eager.py [--reps 3] [--decode 32] [--threads 2]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def machine_info(threads: int) -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, threads={threads}, "
            f"load average at start: {load[0]:.2f}")


@torch.no_grad()
def fx_prefill(model, ids):
    model.reset_caches()
    t = time.perf_counter()
    logits = model(ids, torch.arange(ids.shape[1]))
    return time.perf_counter() - t, logits


@torch.no_grad()
def fx_decode(model, ids, n):
    _, logits = fx_prefill(model, ids)
    tok, pos = logits[:, -1].argmax(-1, keepdim=True), ids.shape[1]
    t = time.perf_counter()
    for _ in range(n):
        logits = model(tok, torch.tensor([pos]))
        tok, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    return time.perf_counter() - t


@torch.no_grad()
def hf_prefill(model, ids):
    t = time.perf_counter()
    out = model(ids, use_cache=True)
    return time.perf_counter() - t, out


@torch.no_grad()
def hf_decode(model, ids, n):
    _, out = hf_prefill(model, ids)
    pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=tok, past_key_values=pkv, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from fxport.models.gemma4.load import build_model, gemma3_270m_gguf, load_gguf

    path = gemma3_270m_gguf()
    fx = build_model(load_gguf(path, progress=False), max_seq_len=args.prompt + args.decode + 1)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    ids = torch.randint(10, 200_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    fx_decode(fx, ids[:, :8], 2)  # warm up both
    hf_decode(hf, ids[:, :8], 2)
    times: dict[str, list[float]] = {k: [] for k in ("fx_p", "hf_p", "fx_d", "hf_d")}
    for _ in range(args.reps):  # interleaved
        times["fx_p"].append(fx_prefill(fx, ids)[0])
        times["hf_p"].append(hf_prefill(hf, ids)[0])
        times["fx_d"].append(fx_decode(fx, ids, args.decode))
        times["hf_d"].append(hf_decode(hf, ids, args.decode))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"## Gemma 3 270M (Q4_K_M GGUF dequantized to fp32), eager PyTorch on CPU\n")
    print(machine_info(args.threads))
    print(f"prefill: {args.prompt}-token prompt, logits for every position; decode: "
          f"{args.decode} tokens after it; median of {args.reps} interleaved repetitions\n")
    print("| implementation | prefill tok/s | decode tok/s | decode ms/token |")
    print("|---|---:|---:|---:|")
    for name, p, d in (("fxport eager", "fx_p", "fx_d"), ("transformers eager", "hf_p", "hf_d")):
        print(f"| {name} | {args.prompt / med[p]:.1f} | {args.decode / med[d]:.2f} | "
              f"{1000 * med[d] / args.decode:.1f} |")
    print("\nfp32 decode ceiling at ~26 GB/s and 1.07 GB of weights per token: ~25 tok/s")


if __name__ == "__main__":
    main()
