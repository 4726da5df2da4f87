"""Two or more CPU ``.pte`` programs of one model side by side: decode-step time, interleaved, and
logits / greedy-token parity against the first.

    .venv/bin/python bench/pte_ab.py A.pte B.pte [C.pte ...] [--rounds 8] [--pos 128]
        [--parity-prompt 700] [--parity-steps 48] [--threads 2]

Timing: every program is loaded in this process; each round prefills the same ``--pos``-token
prompt into each program, then times 16 decode steps (``PteBackend.decode`` in its
``step_context``), programs in A B C / C B A order by round; the first 2 steps of a block and
round 0 (warm-up) are left out. Prints the median ms per step and its ratio to the first program.

Parity (``--parity-steps`` > 0): the same random ``--parity-prompt``-token prompt, prefilled in
chunks of the program's ``max_prefill_chunk``, then the first program's greedy decode steps fed
to every program (teacher-forced: each program sees the same tokens, so a near-tie that one
program breaks the other way does not send the rest of the comparison down another text); prints
for each program in how many steps its top-1 token equals the first program's, the max abs
logits difference (and as a fraction of the first program's logit range), and the steps whose
logits are equal to the bit. A prompt longer than a ring-buffer cache's size exercises the wrap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def step_times(paths: list[Path], rounds: int, pos0: int, threads: int, block: int = 16) -> dict[Path, float]:
    """Median seconds per decode step of each program (see the module docstring)."""
    from fxport.runtime.pte_backend import PteBackend

    backends = {p: PteBackend(p, num_threads=threads) for p in paths}
    prompt = torch.randint(100, 1000, (1, pos0), generator=torch.Generator().manual_seed(0))
    times: dict[Path, list[float]] = {p: [] for p in paths}
    for rnd in range(rounds + 1):  # round 0: warm-up
        for p in (paths if rnd % 2 == 0 else paths[::-1]):
            be = backends[p]
            prefill_chunked(be, prompt)
            for i in range(block):
                t0 = time.perf_counter()
                with be.step_context():
                    be.decode(torch.tensor([[100 + i]]), torch.tensor([pos0 + i]))
                dt = time.perf_counter() - t0
                if rnd and i >= 2:
                    times[p].append(dt)
    return {p: statistics.median(ts) for p, ts in times.items()}


def prefill_chunked(be, prompt: torch.Tensor) -> torch.Tensor:
    """Prefill ``prompt`` (1, n) from position 0 in chunks of the program's ``max_prefill_chunk``;
    the last position's logits, (vocab,)."""
    n, chunk = prompt.shape[1], be.max_prefill_chunk
    for s in range(0, n, chunk):
        out = be.prefill(prompt[:, s:s + chunk], torch.arange(s, min(n, s + chunk)))[:, -1].reshape(-1).clone()
    return out


def greedy_run(path: Path, prompt: torch.Tensor, steps: int, threads: int,
               feed: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Top-1 tokens and the logits (steps + 1, vocab) after a chunked prefill of ``prompt``;
    each decode step is fed the previous top-1 token (greedy), or ``feed[i]`` when given."""
    from fxport.runtime.pte_backend import PteBackend

    be = PteBackend(path, num_threads=threads)
    n = prompt.shape[1]
    out = prefill_chunked(be, prompt)
    logits, tokens = [out], []
    for i in range(steps):
        tokens.append(int(out.argmax()))
        with be.step_context():
            nxt = tokens[-1] if feed is None else feed[i]
            out = be.decode(torch.tensor([[nxt]]), torch.tensor([n + i])).reshape(-1).clone()
        logits.append(out)
    return tokens, torch.stack(logits)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pte", type=Path, nargs="+", help="two or more .pte files of the same model")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--pos", type=int, default=128, help="prompt length before the timed decode steps")
    p.add_argument("--parity-prompt", type=int, default=700)
    p.add_argument("--parity-steps", type=int, default=48, help="0 skips the parity check")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    missing = [str(x) for x in args.pte if not x.is_file()]
    if missing or len(args.pte) < 2:
        p.error(f"need two or more existing .pte files; missing: {missing}")
    la = os.getloadavg()
    print(f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, {args.threads} threads")
    med = step_times(args.pte, args.rounds, args.pos, args.threads)
    base = med[args.pte[0]]
    print("| program | ms / decode step (median) | vs first |\n|---|---:|---:|")
    for path, s in med.items():
        print(f"| {path} | {1e3 * s:.2f} | {s / base:.3f}x |")
    if args.parity_steps:
        prompt = torch.randint(100, 5000, (1, args.parity_prompt), generator=torch.Generator().manual_seed(0))
        ref_tokens, ref = greedy_run(args.pte[0], prompt, args.parity_steps, args.threads)
        span = (ref.max(1).values - ref.min(1).values)
        print(f"\nparity vs {args.pte[0]} ({args.parity_prompt}-token prompt, then its {args.parity_steps} greedy "
              "tokens fed to every program)")
        print("| program | top-1 equal | first differing step | max abs logits diff | of range "
              "| steps equal to the bit |")
        print("|---|---:|---:|---:|---:|---:|")
        for path in args.pte[1:]:
            tokens, logits = greedy_run(path, prompt, args.parity_steps, args.threads, feed=ref_tokens)
            first = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
            d = (logits - ref).abs().max(1).values
            print(f"| {path} | {sum(a == b for a, b in zip(ref_tokens, tokens))} / {len(tokens)} | "
                  f"{'-' if first is None else first} | {d.max():.3g} | {(d / span).max():.1%} | "
                  f"{int((d == 0).sum())} / {len(d)} |")
    la = os.getloadavg()
    print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
