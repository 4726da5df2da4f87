"""End-to-end CPU generation on the Gemma 3 270M GGUF: fxport .pte recipes vs llama.cpp vs transformers,
speed and quality in one table.

One command produces the README table (``make`` not needed)::

    nice .venv/bin/python bench/e2e_cpu.py            # --recipes balanced --reps 3 --threads 2

Per runtime, in one run:

* speed: prefill of a 128-token prompt, then 64 greedy decode steps (one token per call), the
  prompt the same random token ids (ExecuTorch's runner takes text: English text of 128 ids);
  fxport's runtime runs its own generate loop (``fxport.runtime.generate``: sampling included,
  as the runner samples in C++); the runtimes are timed interleaved (A B C A B C ..., ``--reps``
  >= 3 rounds after one warm-up round) and the medians printed, with the load average before
  and after, and the decode step in ms; a per-round table gives each round's decode step per
  runtime, the read bandwidth measured right after the round (a 256 MiB sum) and each
  runtime's ratio to llama.cpp in that round, with how many rounds reach 1.5x;
* quality (``bench/quality.py``): perplexity on text A / text B, mean KL to the fp32 reference
  and top-1 agreement (cached per program under ``build/quality/``);
* bytes read per decode token, file size, peak RSS of one ``fxport run`` (resp. a llama.cpp
  generation) in its own process (``os.wait4``), and decode tok/s as a share of the
  bandwidth ceiling: measured read bandwidth ÷ bytes per token. Bandwidth: the median of 5
  sums over a 1 GiB float32 tensor with the same threads (a read-only stream).

Runtimes: fxport ``.pte`` per recipe in fxport's Python runtime and in ExecuTorch's own C++
``TextLLMRunner`` (``--skip runner`` leaves it out) (``build/gemma3-270m-<recipe>.pte``, exported here when
missing: ``--force-export`` rebuilds), llama.cpp through llama-cpp-python on the same GGUF (see
``bench/quality.py LLAMACPP_INSTALL`` for the install command that works on AMX CPUs),
transformers 5 eager fp32 (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``), and
optimum-executorch 1.1.0's program for the same GGUF (8da8w, custom SDPA / KV cache) in the same
``TextLLMRunner`` when ``build/optimum/model.pte`` exists (``--optimum-pte``; its own virtualenv builds it:
``bench/optimum_peer.py --venv /work/oe-venv``, whose docstring has the recipe).

The process re-executes itself with glibc's transparent huge pages for large allocations
(``--huge-pages on``, the default, as ``fxport run`` does: :mod:`fxport.runtime.huge_pages`);
every runtime is timed in this one process, so llama.cpp's buffers get them too. ``--huge-pages
off`` measures without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


# ----------------------------------------------------------------------------- programs


def pte_path(recipe: str) -> Path:
    return BUILD / f"gemma3-270m-{recipe}.pte"


#: the options a recipe name takes after "+": fxport export --custom-sdpa (the default) / --no-custom-sdpa
ATTENTION_OPTIONS = {"": None, "custom-sdpa": True, "no-custom-sdpa": False}


def ensure_pte(recipe: str, gguf: Path, force: bool = False) -> Path:
    """The recipe's .pte (max_seq_len 512, prefill chunk 128) and its ``.bytes`` sidecar, rebuilt
    when its build manifest's inputs (fxport's code, the GGUF, the options) changed, or ``force``."""
    out = pte_path(recipe)
    quant, _, option = recipe.partition("+")  # "balanced+no-custom-sdpa": fxport export --no-custom-sdpa
    if option not in ATTENTION_OPTIONS:
        raise SystemExit(f"--recipes {recipe}: a recipe takes one of the options "
                         f"{', '.join('+' + o for o in ATTENTION_OPTIONS if o)}")
    from fxport.builder import BuildOptions, Source, build, build_inputs, reuse_decision

    options = BuildOptions(quant=quant, max_seq_len=Q.WINDOW, max_prefill_chunk=128, custom_sdpa=ATTENTION_OPTIONS[option])
    source = Source(gguf=gguf)
    if not force and out.with_suffix(".bytes").is_file() and reuse_decision(out, build_inputs(source, options))[0]:
        return out
    print(f"exporting {out} (recipe {recipe}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model = build(source, out, options, reuse=not force).model  # the quantized eager model it exported
    if model is None:  # the build reused its files: the same recipe on an eager copy
        from fxport.lowering.xnnpack_quant import quantize_for_xnnpack
        from fxport.models.gemma4.load import load_model
        from fxport.models.gemma4.tokenizer import load_tokenizer

        model, tok_src = load_model(gguf, max_seq_len=Q.WINDOW, progress=False)
        if quant:
            quantize_for_xnnpack(model, quant, tokenizer=load_tokenizer(tok_src))
    # the bytes a token reads, as bench/quality.py counts them
    out.with_suffix(".bytes").write_text(str(Q.linear_bytes(model)))
    print(f"exported {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- runtimes


class FxportRuntime:
    def __init__(self, pte: Path, threads: int):
        from fxport.runtime.pte_backend import PteBackend

        self.backend = PteBackend(pte, num_threads=threads)

    def run(self, ids: list[int], prompt_len: int) -> tuple[float, float]:
        """fxport's generate loop, greedy: (prefill s, decode s scaled to ``len(ids) - prompt_len`` steps)."""
        from fxport.runtime.generate import generate

        steps = len(ids) - prompt_len
        g = generate(self.backend, None, ids[:prompt_len], steps + 1)  # the first new token comes from prefill
        return g.prefill_s, g.decode_s * steps / max(g.decode_steps, 1)  # an end id may stop it early


class StockRunnerRuntime:
    """ExecuTorch's own C++ ``TextLLMRunner`` (the runner apps ship) on a fxport ``.pte``: it takes
    text, so the prompt is English text of about ``prompt_len`` ids; times come from its ``Stats``
    (ms clock) and are scaled to exactly ``prompt_len`` prompt ids and ``new_tokens`` decode steps.
    ``tokenizer``: a ``tokenizer.json`` not beside the program (optimum-executorch's: :func:`optimum_tokenizer`)."""

    def __init__(self, pte: Path, prompt_len: int, tokenizer: Path | None = None):
        from fxport.runtime.stock_runner import StockRunner, bench_prompt

        self.runner = StockRunner(pte, tokenizer)
        self.prompt = bench_prompt(self.runner.tokenizer, prompt_len)

    def run(self, ids: list[int], prompt_len: int) -> tuple[float, float]:
        steps = len(ids) - prompt_len
        g = self.runner.generate(self.prompt, steps + 1)  # the first new token comes from prefill
        return g.prefill_s * prompt_len / g.prompt_tokens, g.decode_s * steps / max(g.generated_tokens, 1)


class LlamaCppRuntime:
    def __init__(self, gguf: Path, threads: int, n_ctx: int, prompt_len: int):
        self.llm = Q.load_llamacpp(gguf, n_ctx, threads, logits_all=False, n_batch=prompt_len)

    def run(self, ids: list[int], prompt_len: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:prompt_len])
        t1 = time.perf_counter()
        for tok in ids[prompt_len:]:
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class TransformersRuntime:
    def __init__(self, gguf: Path, threads: int):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise SystemExit("transformers is not installed: .venv/bin/pip install -e '.[hf]' (or --skip transformers)") from None
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()

    def run(self, ids: list[int], prompt_len: int) -> tuple[float, float]:
        t = torch.tensor([ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.model(t[:, :prompt_len], use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            for i in range(prompt_len, len(ids)):
                out = self.model(t[:, i:i + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def logits(self, window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([window])).logits[0].float()


# ----------------------------------------------------------------------------- optimum-executorch peer (issue 24)

OPTIMUM_PTE = BUILD / "optimum" / "model.pte"  # bench/optimum_peer.py writes it (with its tokenizer in hf/)


def optimum_tokenizer(pte: Path) -> Path:
    """The ``tokenizer.json`` of ``bench/optimum_peer.py``'s checkpoint beside its program."""
    return pte.parent / "hf" / "tokenizer.json"


class OptimumLogits:
    """Teacher-forced logits of optimum-executorch's program through ``executorch.runtime``. Its
    contract: method ``forward(input_ids (1, L) int64, cache_position (L,) int64) -> logits (1, L, V)``
    for every position, ``L <= max_seq_len - 1``, KV caches inside. A window is fed ``chunk`` tokens
    per call from position 0 (the caches' stale entries lie at later positions, which the causal and
    ring-buffer masks exclude, as when its runner starts a new sequence). Default 1, as the fxport
    rows are scored and as its runner decodes (XNNPACK's kernels differ slightly with the row count:
    on 64 Apache-2.0 tokens KL to transformers fp32 is 0.047 one token per call, 0.050 in one call)."""

    def __init__(self, pte: Path, chunk: int = 1):
        import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed embedding ops)
        from executorch.runtime import Runtime

        from fxport.contract import load_llm_kernels

        load_llm_kernels()  # llama::custom_sdpa / update_cache
        self.program = Runtime.get().load_program(str(pte))
        self.method = self.program.load_method("forward")
        self.chunk = chunk

    def __call__(self, window: list[int]) -> torch.Tensor:
        rows = []
        for s in range(0, len(window), self.chunk):
            part = window[s:s + self.chunk]
            out = self.method.execute([torch.tensor([part]), torch.arange(s, s + len(part))])[0]
            rows.append(out[0].float().clone())  # (L, V)
        return torch.cat(rows)


def optimum_bytes(pte: Path) -> int | None:
    """Bytes one decode step of the 8da8w program reads, from its checkpoint's shapes: every linear
    weight (the tied head too) at 1 byte + a float32 scale per output channel, and one int8 row of
    the embedding table with its scale."""
    from safetensors import safe_open

    st = pte.parent / "hf" / "model.safetensors"
    if not st.is_file():
        return None
    total = 0
    with safe_open(str(st), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if len(shape) != 2:
                continue
            if name.endswith("embed_tokens.weight"):
                total += shape[0] * shape[1] + 4 * shape[0] + shape[1] + 4  # head (tied) + one embedding row
            else:
                total += shape[0] * shape[1] + 4 * shape[0]
    return total


# ----------------------------------------------------------------------------- measurements


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5, x: torch.Tensor | None = None) -> float:
    """Median bytes/s of ``x.sum()`` over a ``gib`` GiB float32 tensor (a read-only stream);
    ``x``: a float32 tensor to read instead (a probe repeated between timed rounds allocates once)."""
    torch.set_num_threads(threads)
    if x is None:
        x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


#: issue 24's decode goal, x llama.cpp
DECODE_GOAL = 1.5


def rounds_at_goal(ratios: list[float]) -> str:
    """In how many rounds a runtime's decode reached :data:`DECODE_GOAL` x llama.cpp, with the extremes."""
    return (f"decode >= {DECODE_GOAL}x llama.cpp in {sum(r >= DECODE_GOAL for r in ratios)} of {len(ratios)} "
            f"rounds (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


def per_round_table(times: dict[str, list[tuple[float, float]]], round_bw: list[float], new_tokens: int) -> str:
    """Each timed round's decode ms per step, the read bandwidth measured right after it, and each
    runtime's decode ratio to llama.cpp in that round: the machine's bandwidth moves from minute to
    minute, and a bandwidth-bound program's step (and its ratio to a compute-bound one) with it."""
    keys = [k for k in times if k != "transformers"]
    head = "| round | read GB/s after it | " + " | ".join(f"{k} ms" for k in keys)
    ratio_keys = [k for k in keys if k != "llamacpp"] if "llamacpp" in times else []
    head += "".join(f" | {k} vs llama.cpp" for k in ratio_keys) + " |"
    rows = [head, "|" + "---:|" * (2 + len(keys) + len(ratio_keys))]
    for i, bw in enumerate(round_bw):
        ms = {k: 1e3 * times[k][i][1] / new_tokens for k in keys}
        cells = [str(i + 1), f"{bw / 1e9:.1f}", *(f"{ms[k]:.2f}" for k in keys),
                 *(f"{ms['llamacpp'] / ms[k]:.2f}x" for k in ratio_keys)]
        rows.append("| " + " | ".join(cells) + " |")
    lines = ["per round (decode ms per step; the bandwidth of a 256 MiB float32 sum right after the round):", *rows]
    for k in ratio_keys:
        ratios = [times["llamacpp"][i][1] / times[k][i][1] for i in range(len(round_bw))]
        lines.append(f"{k}: {rounds_at_goal(ratios)}")
    return "\n".join(lines)


_RSS_FXPORT = """
import sys, torch
from fxport.runtime.pte_backend import PteBackend
from fxport.runtime.stock_runner import rss_bytes
import executorch.runtime, executorch.kernels.quantized
before = rss_bytes()
b = PteBackend(sys.argv[1], num_threads=int(sys.argv[2]))
ids = torch.randint(0, b.vocab_size, (1, 192), generator=torch.Generator().manual_seed(0))
b.prefill(ids[:, :128], torch.arange(128))
for p in range(128, 192):
    b.decode(ids[:, p:p + 1], torch.tensor([p]))
print("DELTA", rss_bytes() - before)
"""

# The prompt text comes from argv: fxport's Python tokenizer (bench_prompt) would add ~290 MB to this process
# (and free it for the runner to reuse).
_RSS_RUNNER = """
import sys
from fxport.runtime.stock_runner import StockRunner
r = StockRunner(sys.argv[1], *sys.argv[3:4])  # argv[3]: a tokenizer.json not beside the program
print("TOKENIZER", r.rss_delta())  # the runner reads its tokenizer when created, the program at its first generate
r.generate(sys.argv[2], 65)
print("DELTA", r.rss_delta())
"""

_RSS_LLAMA = """
import sys, random
import llama_cpp
from fxport.runtime.stock_runner import rss_bytes
before = rss_bytes()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_batch=128, n_threads=int(sys.argv[2]), verbose=False)
rng = random.Random(0); ids = [rng.randrange(100, llm.n_vocab()) for _ in range(192)]
llm.eval(ids[:128])
for t in ids[128:]:
    llm.eval([t])
print("DELTA", rss_bytes() - before)
"""


def peak_rss(cmd: list[str]) -> tuple[float, float | None, float | None] | None:
    """(peak resident set, RSS the program added, RSS its tokenizer added) in MB of ``cmd`` run
    to completion; None if it failed.

    The second figure is what ``cmd`` prints as ``DELTA <bytes>``: RSS after loading the program
    and generating minus RSS before loading it (the interpreter, torch and the runtime's own
    libraries not counted); the third what it prints as ``TOKENIZER <bytes>`` (None: nothing).

    Launched through a small Python wrapper: a child forked from this (large) process would
    count this process's pages in its ``ru_maxrss`` before its exec.
    """
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    out = subprocess.run([sys.executable, "-S", "-c", wrapper, *cmd], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    kib = int(lines[-1]) if lines else -1
    if kib < 0:
        print(f"peak RSS run failed ({' '.join(cmd[:4])} ...): {out.stderr[-300:]}", file=sys.stderr)
        return None
    def printed(tag: str) -> float | None:
        values = [int(line.split()[1]) / 2**20 for line in lines if line.startswith(tag + " ")]
        return values[-1] if values else None

    return kib / 1024, printed("DELTA"), printed("TOKENIZER")  # KiB -> MiB


def without_mlock() -> list[str] | None:
    """A command prefix that runs a child without the right to lock memory, or None when this
    process has no such right to drop (not root) or ``setpriv`` is missing.

    ExecuTorch's loader maps the ``.ptd`` and mlocks it, ignoring a failure: as root the lock
    holds every page of the embedding table resident (161 MiB for the 270M) where a normal user's
    process (RLIMIT_MEMLOCK of a few MiB) keeps only the rows it read. llama.cpp does not lock."""
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"]


def quality_of(name: str, key_file: Path | None, corpus, ref, logits_fn) -> Q.Score:
    """Score a runtime, cached in build/quality/<name>-<corpus>-<mtime>.json."""
    tag = f"{name}-{corpus.key()}" + (f"-{int(key_file.stat().st_mtime)}" if key_file else "")
    path = Q.CACHE / f"{tag}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        return Q.Score(d["nll"], d["count"], d["kl"], d["agree"], d["positions"])
    sc, dt = Q.score(corpus, ref, logits_fn)
    print(f"scored {name} in {dt:.0f} s", file=sys.stderr, flush=True)
    path.write_text(json.dumps(sc.__dict__))
    return sc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=["balanced"],
                   help="fxport XNNPACK recipes (one .pte each); RECIPE+no-custom-sdpa builds it with --no-custom-sdpa "
                        "(attention inside XNNPACK; the default is --custom-sdpa)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp", "quality", "rss", "runner", "optimum"])
    p.add_argument("--force-export", action="store_true")
    p.add_argument("--optimum-pte", type=Path, default=OPTIMUM_PTE if OPTIMUM_PTE.is_file() else None,
                   help="optimum-executorch's program for a peer row (bench/optimum_peer.py builds it; default: "
                        "build/optimum/model.pte if it exists, else no row)")
    p.add_argument("--huge-pages", choices=["on", "off"], default="on",
                   help="run this process (so every runtime in it, llama.cpp too) with glibc's transparent huge "
                        "pages for large allocations (fxport.runtime.huge_pages; default on, as fxport run does)")
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be >= 3 (medians of interleaved rounds)")
    from fxport.runtime import huge_pages

    if args.huge_pages == "on" and argv is None:
        huge_pages.reexec_with_huge_pages([sys.executable, *sys.argv])
    elif args.huge_pages == "off" and huge_pages.enabled():
        p.error("--huge-pages off: unset GLIBC_TUNABLES's glibc.malloc.hugetlb first (it is read at start)")
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)

    from fxport.models.gemma4.load import gemma3_270m_gguf, load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer

    gguf = gemma3_270m_gguf()
    ptes = {r: ensure_pte(r, gguf, args.force_export) for r in args.recipes}
    optimum = None if "optimum" in args.skip else args.optimum_pte
    if optimum is not None and not optimum.is_file():
        p.error(f"--optimum-pte {optimum}: no such file; build it with bench/optimum_peer.py --venv /work/oe-venv")

    # ---- quality (cached)
    qual: dict[str, Q.Score | None] = {}
    nbytes: dict[str, int | None] = {"reference": None}
    if "quality" not in args.skip:
        reference, tok_src = load_model(gguf, max_seq_len=Q.WINDOW, progress=False)
        tokenizer = load_tokenizer(tok_src)
        corpus = Q.build_corpus(tokenizer)
        ref = Q.reference_logp(corpus, reference, gguf)
        nbytes["reference"] = Q.linear_bytes(reference)
        del reference
        qual["reference"] = Q._self_score(corpus, ref)
        for r, pte in ptes.items():
            rt = FxportRuntime(pte, args.threads)
            qual[r] = quality_of(f"pte-{r}", pte, corpus, ref, lambda w: Q.pte_logits(rt.backend, w))
            del rt
        if optimum is not None:
            om = OptimumLogits(optimum)
            qual["optimum"] = quality_of("optimum", optimum, corpus, ref, om)
            del om
        if "llamacpp" not in args.skip:
            llm = Q.load_llamacpp(gguf, Q.WINDOW, args.threads, logits_all=True)
            print(Q.check_tokenizers(tokenizer, llm), file=sys.stderr)
            qual["llamacpp"] = quality_of("llamacpp", gguf, corpus, ref, lambda w: Q.llamacpp_logits(llm, w))
            del llm
        if "transformers" not in args.skip:
            tr = TransformersRuntime(gguf, args.threads)
            qual["transformers"] = quality_of("transformers", gguf, corpus, ref, tr.logits)
            del tr
        del ref

    for r, pte in ptes.items():
        side = pte.with_suffix(".bytes")
        nbytes[r] = int(side.read_text()) if side.is_file() else None
    nbytes["llamacpp"] = Q.gguf_bytes(gguf)
    nbytes["transformers"] = nbytes["reference"]
    from fxport.runtime.pte_backend import program_bytes

    sizes = {r: program_bytes(pte) for r, pte in ptes.items()}  # .pte + its .ptd weights
    sizes["llamacpp"] = gguf.stat().st_size
    if optimum is not None:  # its weights are inside the .pte
        nbytes["optimum"], sizes["optimum"] = optimum_bytes(optimum), optimum.stat().st_size

    # ---- speed, interleaved
    runtimes: dict[str, object] = {r: FxportRuntime(pte, args.threads) for r, pte in ptes.items()}
    if "runner" not in args.skip:
        runtimes.update({f"runner-{r}": StockRunnerRuntime(pte, args.prompt_len) for r, pte in ptes.items()})
    if optimum is not None:
        # optimum-executorch 1.1.0's program (bench/optimum_peer.py: XNNPACK 8da8w, custom SDPA and KV cache),
        # timed exactly as the runner-* rows; its checkpoint's tokenizer.json has fxport's vocabulary
        runtimes["optimum"] = StockRunnerRuntime(optimum, args.prompt_len, optimum_tokenizer(optimum))
    if "llamacpp" not in args.skip:
        runtimes["llamacpp"] = LlamaCppRuntime(gguf, args.threads, args.prompt_len + args.new_tokens + 8, args.prompt_len)
    if "transformers" not in args.skip:
        runtimes["transformers"] = TransformersRuntime(gguf, args.threads)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 262144, (args.prompt_len + args.new_tokens,), generator=g).tolist()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runtimes}
    round_bw: list[float] = []  # read bandwidth right after each timed round
    probe = torch.ones(2**28 // 4)  # 256 MiB float32, allocated once
    load_speed = os.getloadavg()
    for rnd in range(args.reps + 1):  # round 0 = warm-up
        for k, rt in runtimes.items():
            t = rt.run(ids, args.prompt_len)
            if rnd:
                times[k].append(t)
        if rnd:
            round_bw.append(read_bandwidth(args.threads, reps=3, x=probe))
    load_after = os.getloadavg()
    del runtimes, probe
    bw = read_bandwidth(args.threads)

    rss: dict[str, tuple | None] = {}
    rss_nolock: dict[str, tuple | None] = {}
    nolock = without_mlock()
    if "rss" not in args.skip:
        for r, pte in ptes.items():
            rss[r] = peak_rss([sys.executable, "-c", _RSS_FXPORT, str(pte), str(args.threads)])
            if nolock:
                rss_nolock[r] = peak_rss(nolock + [sys.executable, "-c", _RSS_FXPORT, str(pte), str(args.threads)])
            if "runner" not in args.skip:
                from fxport.runtime.stock_runner import bench_prompt, default_tokenizer

                prompt = bench_prompt(default_tokenizer(pte), args.prompt_len)
                rss[f"runner-{r}"] = peak_rss([sys.executable, "-c", _RSS_RUNNER, str(pte), prompt])
                if nolock:
                    rss_nolock[f"runner-{r}"] = peak_rss(nolock + [sys.executable, "-c", _RSS_RUNNER, str(pte), prompt])
        if "llamacpp" not in args.skip:
            rss["llamacpp"] = peak_rss([sys.executable, "-c", _RSS_LLAMA, str(gguf), str(args.threads)])
        if optimum is not None:
            from fxport.runtime.stock_runner import bench_prompt

            tok_json = optimum_tokenizer(optimum)
            cmd = [sys.executable, "-c", _RSS_RUNNER, str(optimum), bench_prompt(tok_json, args.prompt_len), str(tok_json)]
            rss["optimum"] = peak_rss(cmd)
            if nolock:
                rss_nolock["optimum"] = peak_rss(nolock + cmd)

    labels = {"reference": "reference fp32 (GGUF dequantized)", "llamacpp": "llama.cpp (llama-cpp-python 0.3.36), same GGUF",
              "transformers": "transformers eager fp32"}
    labels.update({r: f"fxport .pte `{r}`" for r in ptes})
    labels.update({f"runner-{r}": f"same `{r}` .pte in ExecuTorch's TextLLMRunner" for r in ptes})
    labels["optimum"] = "optimum-executorch 8da8w (TextLLMRunner)"
    for r in ptes:  # the runner reads the same program: same quality, bytes, file
        for table in (qual, nbytes, sizes):
            if r in table:
                table[f"runner-{r}"] = table[r]
    print(f"Gemma 3 270M Q4_K_M GGUF ({sizes['llamacpp'] / 1e6:.0f} MB), {args.threads} threads, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} decode steps; median of {args.reps} interleaved rounds "
          f"after a warm-up round")
    print(f"load average: at start {load_start[0]:.2f}, before timing {load_speed[0]:.2f}, after timing "
          f"{load_after[0]:.2f} (1-min); read bandwidth {bw / 1e9:.1f} GB/s (1 GiB float32 sum, median of 5); "
          f"transparent huge pages for large allocations: {'on' if huge_pages.enabled() else 'off'} "
          "(one process: every runtime alike)")
    if qual:
        print(f"quality: texts A = {Q.TEXTS['A']}, B = {Q.TEXTS['B']}, {Q.N_TOKENS} tokens each, "
              f"{Q.WINDOW}-token windows; fxport .pte scored one token per call, teacher-forced"
              + ("; optimum-executorch's program too (its forward, which returns every position's logits)"
                 if "optimum" in qual else ""))
    print("| runtime | ppl A | ppl B | KL to ref | top-1 agree | bytes/token | file | peak RSS | RSS added | "
          "prefill tok/s | decode tok/s | decode % of BW ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = [x for r in ptes for x in (r, f"runner-{r}")] + ["optimum"]
    for k in ["reference", *order, "llamacpp", "transformers"]:
        if k != "reference" and k not in times:
            continue
        sc = qual.get(k)
        qcols = ("—",) * 4 if sc is None else (f"{sc.ppl('A'):.2f}", f"{sc.ppl('B'):.2f}", f"{sc.mean_kl:.3f}",
                                              f"{100 * sc.agreement:.1f}%")
        nb = nbytes.get(k)
        if k in times:
            pre = statistics.median(args.prompt_len / t[0] for t in times[k])
            dec = statistics.median(args.new_tokens / t[1] for t in times[k])
            ceiling = f"{100 * dec / (bw / nb):.0f}%" if nb else "—"
            speed = (f"{pre:.0f}", f"{dec:.1f}", ceiling)
        else:
            speed = ("—", "—", "—")
        size = f"{sizes[k] / 1e6:.0f} MB" if k in sizes else "—"
        peak, added, _ = rss.get(k) or (None, None, None)
        cols = [labels[k], *qcols, f"{nb / 1e6:.0f} MB" if nb else "—", size, f"{peak:.0f} MB" if peak else "—",
                f"{added:.0f} MB" if added is not None else "—", *speed]
        print("| " + " | ".join(cols) + " |")
    steps = ", ".join(f"{k} {1e3 * statistics.median(t[1] for t in times[k]) / args.new_tokens:.2f}"
                      for k in times)
    print(f"decode ms per step (median): {steps}")
    print(per_round_table(times, round_bw, args.new_tokens))
    if "llamacpp" in times:
        base = [statistics.median(args.prompt_len / t[0] for t in times["llamacpp"]),
                statistics.median(args.new_tokens / t[1] for t in times["llamacpp"])]
        for r in [r for r in order if r in times]:
            pre = statistics.median(args.prompt_len / t[0] for t in times[r])
            dec = statistics.median(args.new_tokens / t[1] for t in times[r])
            line = f"{r}: prefill {pre / base[0]:.2f}x llama.cpp, decode {dec / base[1]:.2f}x"
            if r in qual and "llamacpp" in qual:
                a, b = qual[r], qual["llamacpp"]
                line += (f"; perplexity {100 * (a.ppl('A') / b.ppl('A') - 1):+.1f}% / "
                         f"{100 * (a.ppl('B') / b.ppl('B') - 1):+.1f}% vs llama.cpp")
            print(line)
    print(f"peak RSS: one process loading the program and generating {args.new_tokens} tokens after a "
          f"{args.prompt_len}-token prompt (python + runtime), from os.wait4; RSS added: RSS after that minus "
          "RSS before loading the program (interpreter, torch and runtime libraries not counted)")
    unlocked = [f"{k} {v[1]:.0f} MB" for k, v in rss_nolock.items() if v and v[1] is not None]
    if unlocked:
        print("RSS added without the right to lock memory (as a normal user runs it; this run is root, and ExecuTorch's "
              f"loader mlocks the .ptd's lookup table; llama.cpp locks nothing): {', '.join(unlocked)}")
    tok = [f"{k} {rss[k][2]:.0f} MB" for k in rss if rss[k] and rss[k][2] is not None]
    if tok:
        print(f"of the runner's RSS added, its tokenizer (ExecuTorch's HFTokenizer of tokenizer.json, read when the "
              f"runner is created): {', '.join(tok)}")
    print("ExecuTorch's TextLLMRunner: ExecuTorch's threadpool (shared with fxport's runtime in this process: "
          f"{args.threads} threads), times from its Stats; fxport's runtime: its generate loop, greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
