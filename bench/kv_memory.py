"""KV-cache memory before/after RingBufferKVCache, and the pass pipeline's wall time.

For presets 31b and e4b at 8K, 32K and 128K context, the model is built on the meta device
(no weights, no memory), cast to bfloat16 (the deployed cache dtype), exported (decode method;
both methods share the same buffers), and RingBufferKVCache (windows from the config, R = 2 x
window) is applied through ``fxport.passes.apply``. KV bytes are the sum of every
``*_cache`` buffer of the program before and after. For 31b at 8K both methods are exported
(prefill with chunks up to window + 1 = R - window + 1) and ``apply`` is timed per method.

A second table: the k_eq_v global layers keeping one cache
(:func:`fxport.models.gemma4.model.derive_keys_from_values`: K is derived from the V cache at
every step, so the K cache of those layers is gone): KV bytes with ring buffers alone and with
both, from the buffers of the meta-device model (the global caches are not ringed, so the
saving adds to RingBufferKVCache's), and the bytes a decode step reads and writes in exchange
(the derived keys: one more read of V and one write of K per k_eq_v layer, before attention
reads K and V).

Run: ``.venv/bin/python bench/kv_memory.py`` (a few minutes on 2 CPU cores; prints two tables).
"""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import Gemma4ForCausalLM, derive_keys_from_values
from fxport.passes.pipeline import apply
from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache

PRESETS = ("31b", "e4b")
CONTEXTS = (8 * 1024, 32 * 1024, 128 * 1024)
TIMED = ("31b", 8 * 1024)  # (preset, context) whose two methods go through a timed apply


def cache_bytes(ep) -> int:
    tensors = {**ep.state_dict, **ep.constants}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if n.endswith("_cache"))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def measure(preset: str, context: int) -> dict:
    config = get_preset(preset)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config, max_seq_len=context, max_batch_size=1).to(torch.bfloat16)
    timed = (preset, context) == TIMED
    t0 = time.perf_counter()
    if timed:
        programs = export_methods(model, max_prefill_chunk=config.sliding_window + 1)
    else:
        tokens, pos = torch.zeros(1, 1, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
        programs = {"decode": torch.export.export(model, (tokens, pos)).run_decompositions({})}
    export_s = time.perf_counter() - t0
    row = {"preset": preset, "context": context, "export_s": export_s, "seconds": {}}
    for method, ep in programs.items():
        t0 = time.perf_counter()
        result = apply(ep, [RingBufferKVCache(config=config)], method=method, dump=False)
        row["seconds"][method] = time.perf_counter() - t0
        if method == "decode":
            stats = result.records[0].stats
            row |= {
                "before": cache_bytes(ep),
                "after": cache_bytes(result.ep),
                "rewritten": stats.rewritten,
                "sliding_before": sum(s.get("bytes_before", 0) for s in stats.sites),
                "sliding_after": sum(s.get("bytes_after", 0) for s in stats.sites),
            }
    return row


def single_cache_saving(preset: str, context: int) -> dict:
    """Bytes of the K caches derive_keys_from_values() drops (meta model, bf16), and the count."""
    config = get_preset(preset)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config, max_seq_len=context, max_batch_size=1).to(torch.bfloat16)
    before = {n: b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_cache")}
    changed = derive_keys_from_values(model)
    after = {n: b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_cache")}
    return {"layers": len(changed), "saved": sum(before.values()) - sum(after.values())}


def main() -> None:
    rows = [measure(p, c) for p in tqdm(PRESETS, desc="presets") for c in CONTEXTS]
    print(
        "| preset | context | ringed caches | sliding KV before | sliding KV after | "
        "total KV before | total KV after | saved | apply() wall s (prefill / decode) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        saved = 1 - r["after"] / r["before"]
        secs = r["seconds"]
        wall = f"{secs['prefill']:.1f} / {secs['decode']:.1f}" if "prefill" in secs else "-"
        print(
            f"| {r['preset']} | {r['context'] // 1024}K | {r['rewritten']} | {gib(r['sliding_before'])} | "
            f"{gib(r['sliding_after'])} | {gib(r['before'])} | {gib(r['after'])} | {saved:.1%} | {wall} |"
        )
    print("\n| preset | context | k_eq_v layers | KV with ring buffers | + one cache for k_eq_v | saved | "
          "extra bytes per decode step (read V + write K) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = single_cache_saving(r["preset"], r["context"])
        after = r["after"] - s["saved"]
        print(f"| {r['preset']} | {r['context'] // 1024}K | {s['layers']} | {gib(r['after'])} | {gib(after)} | "
              f"{gib(s['saved'])} ({s['saved'] / r['after']:.1%}) | {gib(2 * s['saved'])} |")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); byte counts do not depend on it")


if __name__ == "__main__":
    main()
