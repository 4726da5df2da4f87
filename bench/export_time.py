"""Compile time of ``fxport export``: the Gemma 3 270M GGUF -> XNNPACK .pte (recipe ``balanced``,
the one ``fxport demo`` builds), stage by stage.

Prints the stage table of :func:`fxport.builder.build` (wall and CPU seconds per stage, with the
load average: on a shared machine wall time is inflated by waiting for a core, CPU seconds are
not), then the program's greedy tokens on the demo prompt, so a faster build can be checked to
produce the same program (same tokens, same file digest).

    python bench/export_time.py                      # the 270M XNNPACK export, --quant balanced
    python bench/export_time.py --legacy             # the same through the old lowering path
    python bench/export_time.py --rounds 3           # 3 builds, one process each: median per stage
    python bench/export_time.py --rounds 2 --versus-legacy   # current and legacy interleaved, A B A B
    python bench/export_time.py --cuda-31b           # the 31B-shaped meta-device CUDA dry run

``--legacy`` builds the way fxport did before the compile-time work: ExecuTorch's own path, none
of the builder's compile-time patches (``BuildOptions(speedups=False)``, ``fxport export
--no-speedups``), for the before/after table. With
``--rounds`` each build runs in a fresh process (imports and caches cold, as ``fxport export``
runs) and the table gives the median of each stage; every build must write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} cores"


def export_270m(args: argparse.Namespace) -> None:
    from fxport.builder import BuildOptions, Source, build
    from fxport.models.gemma4.load import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    options = BuildOptions(backend="xnnpack", quant=args.quant, max_seq_len=args.max_seq_len,
                           max_prefill_chunk=args.max_prefill_chunk, speedups=not args.legacy)
    t0 = time.perf_counter()
    result = build(Source(gguf=gguf), args.out, options, progress=args.json is None)
    wall = time.perf_counter() - t0
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()[:16]
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": result.times.seconds, "cpu": result.times.cpu_seconds,
                                               "wall": wall, "sha256": digest, "load": os.getloadavg()}))
        return
    label = "legacy" if args.legacy else "current"
    print(f"## fxport export --gguf {gguf.name} --backend xnnpack --quant {args.quant} ({label})")
    print(result.times.table())
    from fxport.runtime.pte_backend import program_bytes

    print(f"build() wall {wall:.1f} s; program {args.out} {program_bytes(args.out) / 2**20:.1f} MiB (with its .ptd), "
          f"sha256 {digest}")
    if args.tokens:
        from fxport.models.gemma4.tokenizer import load_tokenizer
        from fxport.runtime.generate import generate
        from fxport.runtime.pte_backend import PteBackend

        tok = load_tokenizer(result.tokenizer_dir)
        gen = generate(PteBackend(args.out, num_threads=args.threads), tok, args.prompt, args.max_new_tokens)
        print(f"greedy tokens on {args.prompt!r}: {gen.tokens}")
        print(f"text: {gen.text!r}")


def rounds(args: argparse.Namespace) -> None:
    """``args.rounds`` builds per variant, each in its own process, interleaved (A B A B ...):
    the median wall seconds of each stage, per variant."""
    import statistics
    import subprocess
    import tempfile

    variants = ["current", "legacy"] if args.versus_legacy else ["current"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    base = [sys.executable, __file__, "--quant", args.quant, "--out", args.out, "--max-seq-len", str(args.max_seq_len),
            "--max-prefill-chunk", str(args.max_prefill_chunk), "--no-tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants:
                out = Path(tmp) / f"{v}-{r}.json"
                cmd = base + ["--json", str(out)] + (["--legacy"] if v == "legacy" else [])
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs[v].append(json.loads(out.read_text()))
                print(f"# round {r + 1} {v}: {sum(runs[v][-1]['seconds'].values()):.1f} s "
                      f"(load average {' '.join(f'{x:.2f}' for x in runs[v][-1]['load'])})", flush=True)
    digests = {run["sha256"] for v in variants for run in runs[v]}
    stages = list(runs[variants[0]][0]["seconds"])
    print(f"## fxport export --gguf gemma-3-270m-q4_k_m.gguf --backend xnnpack --quant {args.quant}: "
          f"median of {args.rounds} build(s) per variant, one process each, interleaved")
    print(f"  {'stage':<10}" + "".join(f" {v + ' s':>12}" for v in variants))
    for stage in stages + ["total"]:
        cells = []
        for v in variants:
            vals = [sum(run["seconds"].values()) if stage == "total" else run["seconds"].get(stage, 0.0)
                    for run in runs[v]]
            cells.append(f" {statistics.median(vals):>12.1f}")
        print(f"  {stage:<10}" + "".join(cells))
    for v in variants:  # every build, stage by stage (the machine's noise shows here, not in the medians)
        print(f"  {v}, each build: " + "; ".join(
            f"{sum(run['seconds'].values()):.1f} = " + " + ".join(f"{run['seconds'][s]:.1f}" for s in stages)
            for run in runs[v]))
    print(f"program sha256: {', '.join(sorted(digests))}" + (" (every build the same bytes)" if len(digests) == 1
                                                              else " (BUILDS DIFFER)"))


def cuda_31b(args: argparse.Namespace) -> None:
    from fxport.builder import BuildOptions, Source, build

    options = BuildOptions(backend="cuda", quant=None, max_seq_len=args.max_seq_len,
                           max_prefill_chunk=args.max_prefill_chunk, dry_run=True)
    t0 = time.perf_counter()
    result = build(Source(preset="31b"), None, options, progress=True)
    wall = time.perf_counter() - t0
    print("## fxport export --preset 31b --backend cuda --dry-run (meta device)")
    print(result.times.table())
    print(f"build() wall {wall:.1f} s; fully delegated: {result.report.fully_delegated}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", default="balanced", help="XNNPACK recipe (default balanced, the demo's recipe)")
    p.add_argument("--out", default="build/export-time.pte", help="program path (default build/export-time.pte)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--max-prefill-chunk", type=int, default=128)
    p.add_argument("--legacy", action="store_true", help="lower through the old path (before/after)")
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="skip the greedy-token check")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cuda-31b", action="store_true", help="time the 31B-shaped CUDA dry run instead")
    p.add_argument("--rounds", type=int, default=1, help="builds per variant, one process each (median table)")
    p.add_argument("--versus-legacy", action="store_true", help="with --rounds: interleave legacy builds (A B A B)")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # one build's times, for --rounds
    args = p.parse_args(argv)
    print(f"# {_load()} at start", flush=True)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds} must be at least 1")
    if args.cuda_31b:
        cuda_31b(args)
    elif args.rounds > 1 or args.versus_legacy:
        rounds(args)
    else:
        export_270m(args)
    print(f"# {_load()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
