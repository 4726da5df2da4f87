"""The CUDA dry run of Gemma 4 31B with int4 weights, as ``fxport export`` runs it, in one table.

    python bench/cuda_dryrun.py                          # --preset 31b --quant int4, 1024 positions, chunks of 128
    python bench/cuda_dryrun.py --quant none --max-seq-len 4096

Runs :func:`fxport.builder.build` with ``BuildOptions(backend="cuda", dry_run=True)``: the preset
is built on the meta device (shapes only, no weights), quantized to torchao's int4 form, exported
(prefill + decode), rewritten by the CUDA passes and partitioned by ExecuTorch's
``CudaPartitioner`` (no compilation: that needs a GPU). Prints

* stage times (wall and CPU seconds; on a shared machine wall time includes waiting for a core)
  with the load average at the start and the end;
* per method: its inputs, nodes delegated / not delegated to CudaBackend, partitions, and the
  kernel each int4 linear and each attention site got;
* the bytes of the weights (int4 packed + scales + zeros, float norms and embeddings) and of the
  KV cache, both from shapes and dtypes, so exact for the meta-device program;
* the constant methods the program stores and whether ExecuTorch's LLM-runner contract holds
  (:mod:`fxport.contract`: methods, their inputs and outputs, constant methods).

The numbers describe the program; none is a GPU measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} cores)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    from fxport.builder import BuildOptions, Source, build

    quant = None if args.quant == "none" else args.quant
    command = (f"fxport export --preset {args.preset} --backend cuda{f' --quant {quant}' if quant else ''} --dry-run "
               f"--max-seq-len {args.max_seq_len} --max-prefill-chunk {args.max_prefill_chunk}")
    load_start = _load()
    t0 = time.perf_counter()
    result = build(Source(preset=args.preset), None, BuildOptions(
        backend="cuda", quant=quant, max_seq_len=args.max_seq_len, max_prefill_chunk=args.max_prefill_chunk,
        dry_run=True), progress=not args.quiet)
    wall = time.perf_counter() - t0
    report = result.report
    report.check_contract(result.metadata)  # as fxport export --dry-run does

    print(f"## {command}")
    print(f"load average at start {load_start}, at end {_load()}; build() wall {wall:.1f} s")
    print()
    print("| stage | wall s | cpu s |")
    print("|---|---:|---:|")
    for stage in result.times.order:
        if stage in result.times.seconds:
            print(f"| {stage} | {result.times.seconds[stage]:.1f} | {result.times.cpu_seconds[stage]:.1f} |")
    print(f"| total | {result.times.total:.1f} | {result.times.cpu_total:.1f} |")
    print()
    print("| method | inputs | delegated nodes | partitions | not delegated | int4 linears | attention |")
    print("|---|---|---:|---:|---:|---|---|")
    from fxport.lowering.dryrun import format_signature

    for method, rep in report.delegation.methods.items():
        stats = {r.name: r.stats for r in result.pass_results[method].records}
        int4 = Counter(s["choice"] for s in stats["int4_dispatch"].sites) if "int4_dispatch" in stats else Counter()
        sdpa = Counter(s["choice"] for s in stats["sdpa_dispatch"].sites) \
            if "sdpa_dispatch" in stats else Counter()
        print(f"| {method} | {format_signature(report.signatures.get(method, []))} | "
              f"{sum(rep.delegated_ops.values())} | {rep.delegates} | {len(rep.undelegated)} | "
              f"{', '.join(f'{n} {k}' for k, n in sorted(int4.items())) or '-'} | "
              f"{', '.join(f'{n} {k}' for k, n in sorted(sdpa.items())) or '-'} |")
    state = report.state
    print()
    print("| held by the program | tensors | bytes | GiB |")
    print("|---|---:|---:|---:|")
    print(f"| weights (shared by both methods) | {len(state.weights)} | {state.weight_bytes} | {_gib(state.weight_bytes)} |")
    parts: dict[str, list[int]] = {}
    for name, n in state.weights.items():
        kind = next((f"  int4 {k}" for k in ("packed", "scales", "zeros") if name.endswith(f".weight_{k}")),
                    "  other (float: embeddings, norms, unquantized linears, constants)")
        parts.setdefault(kind, []).append(n)
    for kind in sorted(parts):
        print(f"| {kind} | {len(parts[kind])} | {sum(parts[kind])} | {_gib(sum(parts[kind]))} |")
    dtypes = Counter(str(t.dtype).replace("torch.", "") for ep in (r.ep for r in result.pass_results.values())
                     for name, t in {**ep.state_dict, **ep.constants}.items() if name.endswith(".weight_scales"))
    print(f"| KV cache (mutable buffers, {args.max_seq_len} positions) | {len(state.mutable)} | {state.mutable_bytes} | "
          f"{_gib(state.mutable_bytes)} |")
    if dtypes:
        print(f"(int4 scales and zeros are {', '.join(dtypes)}: the model's dtype)")
    print()
    unsupported = {m: ops for m, ops in report.unsupported.items() if ops}
    print(f"every node delegated: {'yes' if report.fully_delegated else 'NO'}"
          + (f"; ops needing an unsupported fallback: {unsupported}" if unsupported else ""))
    print("constant methods: " + ", ".join(f"{k}={v}" for k, v in report.constant_methods.items()))
    print("runner contract: " + ("ok" if not report.contract else "; ".join(report.contract)))
    return 0 if report.fully_delegated and not report.contract else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="31b", help="model preset (default 31b)")
    p.add_argument("--quant", default="int4", help="CUDA recipe (default int4; 'none' for float)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="KV positions (default 1024, as fxport export)")
    p.add_argument("--max-prefill-chunk", type=int, default=128, help="largest prefill chunk (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
