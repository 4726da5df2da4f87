"""Decode and prefill of each runtime alone in its own process, as a user runs one: fxport's
runtime and ExecuTorch's ``TextLLMRunner`` on a fxport ``.pte``, and llama.cpp on the GGUF.

    .venv/bin/python bench/decode_isolated.py [build/gemma3-270m-balanced.pte] [--rounds 5] [--reps 3]

``bench/e2e_cpu.py`` times every runtime in one process (llama.cpp, the runners and every program
loaded side by side). This script starts one process per runtime per round, the runtimes in a
rotating order (A B C, B C A, ...), each with glibc's transparent huge pages for large
allocations (:mod:`fxport.runtime.huge_pages`, as ``fxport run`` and e2e_cpu.py use them). A
process loads its runtime, runs one warm-up generation (128-token prompt, 64 decode steps: the
runtimes of e2e_cpu.py, the same ids), then ``--reps`` timed ones, and prints its median. The
table gives, per runtime, the median over rounds of those medians, the spread, and the ratio to
llama.cpp; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # e2e_cpu (its runtimes, its program), as e2e_cpu imports quality
import e2e_cpu as E  # noqa: E402

PROMPT, STEPS = 128, 64

_CHILD = """
import json, statistics, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import e2e_cpu as E
kind, path, threads, reps = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
P, N = {prompt}, {steps}
make = {{"fxport": lambda: E.FxportRuntime(path, threads),
         "runner": lambda: E.StockRunnerRuntime(path, P),
         "llama.cpp": lambda: E.LlamaCppRuntime(path, threads, 512, P)}}[kind]
rt = make()
ids = list(range(1000, 1000 + P + N))
rt.run(ids, P)  # warm-up
runs = [rt.run(ids, P) for _ in range(reps)]
print("RESULT", json.dumps({{"prefill_tok_s": statistics.median(P / p for p, _ in runs),
                            "decode_ms": statistics.median(1e3 * d / N for _, d in runs)}}))
""".format(prompt=PROMPT, steps=STEPS)


def run_child(kind: str, path: Path, threads: int, reps: int) -> dict[str, float]:
    """One process: load ``kind`` on ``path``, warm up, time ``reps`` generations; its medians."""
    from fxport.runtime import huge_pages

    env = huge_pages.with_huge_pages(os.environ)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(BENCH), kind, str(path), str(threads), str(reps)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} on {path} failed (exit {out.returncode}): {out.stderr[-600:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pte", nargs="?", type=Path, default=None,
                   help="a fxport CPU .pte (default: bench/e2e_cpu.py's balanced program, built when missing or stale)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="timed generations per process")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from fxport.models.gemma4.load import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    if args.pte is None:
        args.pte = E.ensure_pte("balanced", gguf)
    if not args.pte.is_file():
        p.error(f"{args.pte}: no such file; build it with bench/e2e_cpu.py or fxport export")
    kinds = {"fxport": args.pte, "runner": args.pte, "llama.cpp": gguf}
    order = list(kinds)
    la0 = os.getloadavg()
    got: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in order[r % 3:] + order[:r % 3]:
            got[kind].append(run_child(kind, kinds[kind], args.threads, args.reps))
            print(f"round {r + 1}: {kind} {got[kind][-1]['decode_ms']:.2f} ms / step", file=sys.stderr, flush=True)
    la1 = os.getloadavg()
    ref = statistics.median(x["decode_ms"] for x in got["llama.cpp"])
    ref_pf = statistics.median(x["prefill_tok_s"] for x in got["llama.cpp"])
    print(f"{args.pte.name} vs {gguf.name}: one process per runtime per round, {args.rounds} rounds (rotating order), "
          f"{args.reps} timed generations each after a warm-up; {PROMPT}-token prompt, {STEPS} decode steps, "
          f"{args.threads} threads, huge pages on; load average {la0[0]:.2f} before, {la1[0]:.2f} after")
    print("| runtime | decode ms / step (median, min-max over rounds) | decode tok/s | prefill tok/s | "
          "vs llama.cpp decode / prefill |")
    print("|---|---:|---:|---:|---|")
    for kind, xs in got.items():
        ms = [x["decode_ms"] for x in xs]
        med, pf = statistics.median(ms), statistics.median(x["prefill_tok_s"] for x in xs)
        vs = "—" if kind == "llama.cpp" else f"{ref / med:.2f}x / {pf / ref_pf:.2f}x"
        print(f"| {kind} | {med:.2f} ({min(ms):.2f}-{max(ms):.2f}) | {1e3 / med:.1f} | {pf:.0f} | {vs} |")
    for kind in ("fxport", "runner"):  # a round's ratio: its llama.cpp process over this runtime's
        ratios = [ll["decode_ms"] / x["decode_ms"] for ll, x in zip(got["llama.cpp"], got[kind])]
        print(f"{kind}: {E.rounds_at_goal(ratios)}; per round {', '.join(f'{r:.2f}x' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
