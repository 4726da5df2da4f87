"""Size and speed of the two foreign programs of ``test_stock_runner_foreign``, with and without
fxport's CPU passes, in ExecuTorch's stock ``TextLLMRunner`` (not a test: it prints a table).

    .venv/bin/python -m fxport.tests.foreign.stock_runner_foreign_figures [--rounds 5 --reps 20]

Per program: ``.pte`` bytes, XNNPACK delegates and ops left outside them, and the runner's time
per ``generate`` (the test's prompts, 24 new tokens each; the median of ``--reps`` calls after one
warm-up) with its prefill / decode tok/s from ``Stats``. Each round runs the plain and the
rewritten program in fresh processes, one after the other (A B A B ...); the table has the
median over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fxport.tests.foreign import test_stock_runner_foreign as t

_TIMING = r"""
import json, sys, time
from fxport.runtime.stock_runner import StockRunner
a = json.loads(sys.argv[1])
r = StockRunner(a["pte"], a["tokenizer"])
for p in a["prompts"]:
    r.generate(p, a["new"])  # warm-up: loads the program and XNNPACK's packed weights
calls, prefill, decode = [], [], []
for _ in range(a["reps"]):
    for p in a["prompts"]:
        t0 = time.perf_counter()
        g = r.generate(p, a["new"])
        calls.append(time.perf_counter() - t0)
        prefill.append(g.prefill_tok_s)
        decode.append(g.decode_tok_s)
print("RESULT " + json.dumps({"calls": calls, "prefill": prefill, "decode": decode, "rss": r.rss_delta()}))
"""


def time_runner(pte: Path, tokenizer: Path, prompts: list[str], reps: int) -> dict:
    args = {"pte": str(pte), "tokenizer": str(tokenizer), "prompts": prompts, "new": t.NEW, "reps": reps}
    proc = subprocess.run([sys.executable, "-c", _TIMING, json.dumps(args)], capture_output=True, text=True, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"runner process failed on {pte}: {proc.stderr[-2000:]}")
    out = json.loads(line[-1][len("RESULT "):])
    finite = lambda xs: [x for x in xs if x == x and x != float("inf")]  # noqa: E731  (ms clock: 0 ms -> nan)
    return {"ms": 1000 * statistics.median(out["calls"]), "prefill": statistics.median(finite(out["prefill"]) or [0]),
            "decode": statistics.median(finite(out["decode"]) or [0])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build, prompts in (("ExecuTorch Llama", t.build_llama, t.LLAMA_PROMPTS),
                                      ("optimum-style Qwen2", t.build_hf, t.HF_PROMPTS)):
            (Path(tmp) / label.replace(" ", "_")).mkdir()
            built, _ = build(Path(tmp) / label.replace(" ", "_"))
            timings = {t.PLAIN: [], t.PASSES: []}
            for _ in range(args.rounds):
                for name in (t.PLAIN, t.PASSES):
                    timings[name].append(time_runner(built[name], built["tokenizer"], prompts, args.reps))
            for name in (t.PLAIN, t.PASSES):
                report = built["reports"][name]["forward"]
                med = {k: statistics.median(x[k] for x in timings[name]) for k in ("ms", "prefill", "decode")}
                rows.append((label, name, built[name].stat().st_size, report.delegates, len(report.undelegated), med))
    print(f"{'program':22} {'lowering':8} {'bytes':>8} {'delegates':>9} {'outside':>7} {'ms/generate':>11} "
          f"{'prefill tok/s':>13} {'decode tok/s':>12}")
    for label, name, size, delegates, outside, med in rows:
        print(f"{label:22} {name:8} {size:8d} {delegates:9d} {outside:7d} {med['ms']:11.2f} "
              f"{med['prefill']:13.0f} {med['decode']:12.0f}")


if __name__ == "__main__":
    main()
