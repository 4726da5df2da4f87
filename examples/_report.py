"""What the examples print after fxport's passes: the pass summary, the KV bytes the ring buffers
saved and which kernel each decode attention got (shared by the decoder-only examples)."""

from __future__ import annotations

from fxport.passes import apply


def apply_and_report(methods: dict, passes: list) -> dict:
    """``apply(ep, passes)`` per method (prefill first: one pass object gives both the same ring
    size), printing what changed. Returns ``{method: PipelineResult}``."""
    results = {}
    for method, ep in methods.items():
        result = results[method] = apply(ep, passes, method=method, dump=False)
        print(f"== {method}\n{result.summary()}")
        ring = result["ring_buffer_kv_cache"].stats.sites
        before = sum(s["bytes_before"] for s in ring if "bytes_before" in s)
        after = sum(s["bytes_after"] for s in ring if "bytes_after" in s)
        print(f"ringed caches: {before} -> {after} bytes (saved {before - after}); "
              f"ring sizes {sorted({s['ring_size'] for s in ring if 'ring_size' in s})}")
        for site in result["sdpa_dispatch"].stats.sites:
            print(f"  {site['module']}: {site['choice']} reads K/V {site.get('kv')} ({site['reason']})")
    return results
