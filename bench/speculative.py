"""Speculative decoding with prompt lookup on the real Gemma 3 270M (XNNPACK, recipe ``balanced``).

    .venv/bin/python bench/speculative.py [--new-tokens 96] [--repeats 3] [--k 8] [--threads 2]

Builds (or reuses) ``build/spec/gemma3-270m-verify.pte``: the demo's program plus the
``target_verify`` method (``fxport export --quant balanced --verify-method``). For each task --
grounded ones (repeat, quote, edit a given passage; summarize with quotes; a code edit) and one
free-form prompt -- greedy plain decoding and greedy prompt-lookup decoding run interleaved
(A B A B ..., ``--repeats`` pairs); the table has medians of decode tok/s (tokens after the first
per second of the decode loop) and of end-to-end tok/s (generated tokens over prefill + decode),
the acceptance rate (kept / drafted tokens), tokens per target call, the ratio to plain decode,
and whether the speculative tokens equal plain decoding's in every run.

llama.cpp rows (plain, and llama-cpp-python's ``LlamaPromptLookupDecoding``) on the same GGUF join
the same interleaved rounds when ``import llama_cpp`` works; otherwise a note says they are
skipped. The machine is shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))  # the repository is the package ``fxport``

PASSAGE = (
    "The river rises in the hills above the old mill town, runs south through farmland and forest for "
    "forty miles, and reaches the sea at a wide, shallow estuary where herons feed at low tide. In spring "
    "the water is high and brown with silt; by late summer it is clear enough to see the stones on the "
    "bottom. The mill closed in 1962, and its wheel now turns only for visitors on Sunday afternoons.")

CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total * (1 + tax_rate)
    return round(total, 2)
'''

TASKS = {
    "repeat": f"Repeat the following passage exactly, word for word.\n\n{PASSAGE}",
    "quote": f"{PASSAGE}\n\nQuote the sentence of the passage above that describes the river in summer, "
             "then quote the sentence about the mill.",
    "edit": f"Rewrite the passage below with every 'river' replaced by 'stream'. Keep everything else the same."
            f"\n\n{PASSAGE}",
    "summarize+quotes": f"{PASSAGE}\n\nSummarize the passage above in two sentences, quoting it word for word "
                        "where you can.",
    "code edit": f"Rename the variable `total` to `amount` in this Python function and return the whole "
                 f"function.\n\n```python\n{CODE}```",
    "free-form": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    # the 270M echoes the chat prompts above before anything else: also a plain continuation
    "free-form (raw)": "Once upon a time, in a small village by the sea, there lived",
}
RAW = {"free-form (raw)"}  # no chat template
GROUNDED = [t for t in TASKS if not t.startswith("free-form")]


def chat(text: str) -> str:
    """Gemma's chat turn (the 270M is instruction tuned); BOS comes from the tokenizer."""
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def build_program(out: Path) -> Path:
    from fxport.builder import BuildOptions, Source, build
    from fxport.models.gemma4.load import gemma3_270m_gguf

    options = BuildOptions(backend="xnnpack", quant="balanced", max_seq_len=1024, max_prefill_chunk=128, verify=True)
    result = build(Source(gguf=gemma3_270m_gguf()), out, options, reuse=True)
    print(f"program: {out} ({'reused' if result.reused else 'built'}; methods prefill + target_verify)")
    if not result.reused:
        print(result.times.table())
    return out


def fxport_runs(backend, tokenizer, prompt: str, n: int, drafter):
    from fxport.runtime.generate import generate

    def run(spec):
        r = generate(backend, tokenizer, prompt, n, speculative=spec)
        e2e = len(r.tokens) / (r.prefill_s + r.decode_s)
        return r, r.decode_tok_s, e2e

    return (lambda: run(None)), (lambda: run(drafter))


_LLAMA_NOTE: list[str] = []


def llama_runs(gguf: Path, prompt: str, n: int, threads: int, k: int):
    """(plain, lookup) callables on llama-cpp-python, or None when it is not importable."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:
        if not _LLAMA_NOTE:
            _LLAMA_NOTE.append(f"note: llama.cpp rows skipped: import llama_cpp failed ({exc})")
            print(_LLAMA_NOTE[0])
        return None
    kw = dict(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    plain = llama_cpp.Llama(**kw)
    lookup = llama_cpp.Llama(**kw, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k))

    def run(llm):
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
        dt = time.perf_counter() - t0
        tokens = out["usage"]["completion_tokens"]
        return out["choices"][0]["text"], tokens / dt

    return (lambda: run(plain)), (lambda: run(lookup))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="tokens drafted per verify call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "spec" / "gemma3-270m-verify.pte")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    args = ap.parse_args()

    from fxport.models.gemma4.load import gemma3_270m_gguf
    from fxport.models.gemma4.tokenizer import load_tokenizer
    from fxport.runtime.pte_backend import PteBackend
    from fxport.runtime.speculative import PromptLookup

    out = build_program(args.out)
    backend = PteBackend(out, num_threads=args.threads)
    tokenizer = load_tokenizer(out.with_suffix(".tokenizer"))
    drafter = PromptLookup(k=args.k)
    gguf = gemma3_270m_gguf()
    rows = []
    for task in args.tasks:
        prompt = TASKS[task] if task in RAW else chat(TASKS[task])
        plain, spec = fxport_runs(backend, tokenizer, prompt, args.new_tokens, drafter)
        llama = None if args.no_llama else llama_runs(gguf, prompt, args.new_tokens, args.threads, args.k)
        plain()  # warm-up (first calls of each method pack weights / resize)
        spec()
        m = {"plain": [], "spec": [], "plain e2e": [], "spec e2e": [], "acc": [], "tpc": [], "same": True,
             "llama": [], "llama lookup": [], "llama same": True}
        for _ in range(args.repeats):  # A B A B ...: both see the same load
            a, a_tps, a_e2e = plain()
            b, b_tps, b_e2e = spec()
            m["plain"].append(a_tps)
            m["spec"].append(b_tps)
            m["plain e2e"].append(a_e2e)
            m["spec e2e"].append(b_e2e)
            m["acc"].append(b.speculative.acceptance)
            m["tpc"].append(b.speculative.tokens_per_call)
            m["same"] &= a.tokens == b.tokens
            if llama is not None:
                lp_text, lp = llama[0]()
                ll_text, ll = llama[1]()
                m["llama"].append(lp)
                m["llama lookup"].append(ll)
                m["llama same"] &= lp_text == ll_text
        med = {k: statistics.median(v) for k, v in m.items() if isinstance(v, list) and v}
        rows.append((task, len(a.prompt_tokens), len(b.tokens), med, m["same"], m["llama same"], b.text))
        print(f"  {task}: done (plain {med['plain']:.1f}, lookup {med['spec']:.1f} tok/s)", flush=True)

    load = os.getloadavg()
    print(f"\nGemma 3 270M, XNNPACK balanced, greedy, {args.new_tokens} new tokens, prompt lookup k={args.k} "
          f"(n-grams 3..1), {args.threads} threads; medians of {args.repeats} interleaved runs; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    head = (f"{'task':<17} {'prompt':>6} {'gen':>4} {'plain tok/s':>11} {'lookup tok/s':>12} {'ratio':>6} "
            f"{'e2e ratio':>9} {'accepted':>8} {'tok/call':>8} {'same':>5}")
    if any("llama" in r[3] for r in rows):
        head += f" {'llama.cpp':>9} {'llama lookup':>12} {'same':>5}"
    print(head)
    for task, n_prompt, n_gen, med, same, llama_same, _ in rows:
        line = (f"{task:<17} {n_prompt:>6} {n_gen:>4} {med['plain']:>11.1f} {med['spec']:>12.1f} "
                f"{med['spec'] / med['plain']:>6.2f} {med['spec e2e'] / med['plain e2e']:>9.2f} "
                f"{med['acc']:>8.0%} {med['tpc']:>8.2f} {str(same):>5}")
        if "llama" in med:
            line += f" {med['llama']:>9.1f} {med['llama lookup']:>12.1f} {str(llama_same):>5}"
        print(line)
    print("\ngenerated text (the same for both; the first 160 characters):")
    for task, *_, text in rows:
        print(f"  {task:<17} {text[:160]!r}")
    grounded = [r[3]["spec"] / r[3]["plain"] for r in rows if r[0] in GROUNDED]
    if grounded:
        print(f"grounded tasks: median ratio {statistics.median(grounded):.2f} (min {min(grounded):.2f}); "
              "tok/s: decode loop (tokens after the first); e2e: all generated tokens over prefill + decode; "
              "llama.cpp: generated tokens over the whole completion call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
