"""Where a ``.pte``'s decode step spends its time: ExecuTorch's own profiler (ETDump), per
delegate call and per XNNPACK operator kind, with the bytes each weight-reading kind moves.

    .venv/bin/python bench/decode_profile.py build/gemma3-270m-balanced.pte [--steps 64] [--threads 2]

Runs ``--steps`` decode steps (positions 0, 1, ...; token ids fixed) and prints, as medians over
the steps (the first, cold ones fall outside the median):

* the step: median wall time of the profiled steps (``Method::execute``), the sum of delegate
  calls, of portable (non-delegated) operators, and the rest;
* one row per delegate call in program order (median µs) with its slowest operators;
* per XNNPACK operator kind (name without its ``#n``), the summed median µs per step.

XNNPACK reports operator times in whole microseconds: operators under 1 µs show as 0 and the
"inside, unattributed" column collects them. Profiling adds a little time per event; compare
the step time with ``bench/e2e_cpu.py``'s decode figure (which runs without the profiler).

Then, without the profiler, where a step of fxport's Python loop goes outside the method
(``--loop-rounds``, 0 skips it): blocks of decode steps interleaved A B C, B C A, C A B ..
after a 128-token prefill, medians per step:

* the method call alone (``Method.execute``: the bindings' input conversion and logits copy);
* ``PteBackend.decode`` + greedy sampling inside ``step_context()``: the generate loop now;
* the same step with torch's ops on torch's own threads (the loop before
  ``pte_backend.torch_ops_inline``): torch's OpenMP workers spin after the logits copy and the
  argmax and take cores from ExecuTorch's threadpool.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def profile(pte: Path, steps: int, threads: int) -> Path:
    """Run decode steps with ETDump on (the decode method, or prefill at L = 1 in a program
    without one); the path of the written ETDump."""
    from fxport.contract import load_llm_kernels

    load_llm_kernels()  # embedding_byte, llama::custom_sdpa
    from executorch.extension.pybindings import portable_lib

    from fxport.fileio import weights_file

    ptd = weights_file(pte)  # the program's weights file, when it has one
    mod = portable_lib._load_for_executorch(str(pte), enable_etdump=True,
                                            data_path=str(ptd) if ptd.is_file() else None)
    portable_lib._unsafe_reset_threadpool(threads)
    method = "decode" if "decode" in mod.method_names() else "prefill"
    for pos in range(steps):
        mod.run_method(method, (torch.tensor([[100 + pos % 1000]]), torch.tensor([pos])))
    out = Path(tempfile.mkdtemp(prefix="fxport-etdump-")) / "decode.etdp"
    mod.write_etdump_result_to_file(str(out))
    return out


def tables(etdump: Path, top: int = 3) -> str:
    from executorch.devtools import Inspector

    ins = Inspector(etdump_path=str(etdump))
    block = next(b for b in ins.event_blocks if b.name == "Execute")
    rows, kinds = [], defaultdict(float)
    inner: list[tuple[str, float]] = []
    step = delegates = portable = 0.0
    for e in block.events:
        if e.perf_data is None:
            continue
        us = e.perf_data.p50 * 1e3  # ms -> µs
        if e.name == "Method::execute":
            step = us
        elif e.name == "DELEGATE_CALL":
            delegates += us
            named = sum(t for _, t in inner)
            slow = ", ".join(f"{n} {t:.0f}" for n, t in sorted(inner, key=lambda x: -x[1])[:top] if t >= 1)
            rows.append(f"| {len(rows)} | {us:,.0f} | {named:,.0f} | {max(us - named, 0):,.0f} | {slow} |")
            inner = []
        elif e.name.startswith("native_call_"):
            portable += us
        elif e.name != "OPERATOR_CALL":
            inner.append((e.name, us))
            kinds[re.sub(r"\s*#\d+$", "", e.name)] += us
    head = (f"decode step {step / 1e3:.2f} ms (median over the profiled steps): delegate calls "
            f"{delegates / 1e3:.2f} ms in {len(rows)} call(s), portable operators {portable / 1e3:.2f} ms, "
            f"rest {max(step - delegates - portable, 0) / 1e3:.2f} ms")
    out = [head, "", "| delegate call | µs | inside, by operator | inside, unattributed | slowest operators (µs) |",
           "|---:|---:|---:|---:|---|", *rows, "", "| XNNPACK operator kind | µs per step | share of step |", "|---|---:|---:|"]
    for k, us in sorted(kinds.items(), key=lambda x: -x[1]):
        if us >= 1:
            out.append(f"| {k} | {us:,.0f} | {100 * us / step:.0f}% |")
    return "\n".join(out)


def loop_breakdown(pte: Path, threads: int, rounds: int, block: int = 16) -> str:
    """Per-step ms of the method call alone vs fxport's generate step now and before (see the
    module docstring), interleaved in blocks of ``block`` steps, ``rounds`` rounds after a warm-up."""
    from fxport.runtime.pte_backend import PteBackend
    from fxport.runtime.samplers import greedy

    backend = PteBackend(pte, num_threads=threads)
    torch_threads = torch.get_num_threads()
    method = backend._decode  # the executorch.runtime Method a decode step calls

    def call_only(tok, pos):
        with backend.step_context():
            method.execute([tok, pos])

    def loop_now(tok, pos):
        with backend.step_context():
            int(greedy(backend.decode(tok, pos).reshape(1, -1))[0])

    def loop_before(tok, pos):  # the bindings' copy and the argmax on torch's own threads
        int(greedy(method.execute([tok, pos])[0].reshape(1, -1))[0])

    loops = {"method call alone": call_only, "generate step now (torch ops inline)": loop_now,
             f"generate step before (torch ops on {torch_threads} torch threads)": loop_before}
    times: dict[str, list[float]] = {k: [] for k in loops}
    prompt = torch.randint(100, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    for rnd in range(rounds + 1):  # round 0: warm-up
        backend.prefill(prompt, torch.arange(128))
        pos = 128
        names = list(loops)
        for name in names[rnd % 3:] + names[:rnd % 3]:  # the order rotates: no loop always follows another
            step = loops[name]
            for i in range(block):
                tok, p = torch.tensor([[100 + pos]]), torch.tensor([pos])
                t0 = time.perf_counter()
                step(tok, p)
                dt = time.perf_counter() - t0
                pos += 1
                if rnd and i >= 2:  # the first steps of a block pay for the previous block's threads
                    times[name].append(dt)
    base = statistics.median(times["method call alone"])
    out = [f"fxport's decode step outside the method: {rounds} rounds x {block} steps per loop, interleaved, "
           f"medians; torch threads {torch_threads}, ExecuTorch threads {threads}", "",
           "| loop | ms / step | vs the method call |", "|---|---:|---:|"]
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        out.append(f"| {name} | {ms:.2f} | {ms / (1e3 * base):.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pte", type=Path, help="a .pte with a decode(tokens (1, 1), input_pos (1,)) method")
    p.add_argument("--steps", type=int, default=64, help="profiled decode steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop-rounds", type=int, default=6,
                   help="rounds of the Python-loop breakdown (method call / generate step now / before); 0 skips it")
    args = p.parse_args(argv)
    if not args.pte.is_file():
        p.error(f"{args.pte}: no such file; build one with `fxport export` or bench/e2e_cpu.py")
    la = os.getloadavg()
    path = profile(args.pte, args.steps, args.threads)
    print(f"{args.pte} · {args.steps} profiled decode steps · {args.threads} threads · "
          f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    print(tables(path))
    if args.loop_rounds:
        torch.set_num_threads(args.threads)
        print()
        print(loop_breakdown(args.pte, args.threads, args.loop_rounds))
        la = os.getloadavg()
        print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
