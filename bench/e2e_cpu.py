"""End-to-end CPU generation speed on the Gemma 3 270M GGUF: fxport .pte vs transformers vs llama.cpp.

One table, same threads, same prompt length, one run each (after one warm-up prefill):

    runtime                          prefill tok/s   decode tok/s
    fxport XNNPACK .pte (8da4w)           ...             ...
    transformers eager fp32               ...             ...
    llama.cpp (llama-cpp-python)          ...             ...

* fxport: the .pte written by ``fxport demo`` / ``fxport export --gguf`` (``--pte``; exported
  here when missing), run with ``executorch.runtime`` via ``PteBackend`` on random token ids.
* transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in fp32 with a
  static-free default cache; prefill = one forward over the prompt, decode = forwards of one
  token with ``past_key_values``.
* llama.cpp: ``llama_cpp.Llama(model_path=gguf, n_threads=T)``; ``eval`` of the prompt, then
  single tokens. Skipped with a message when ``llama-cpp-python`` (extra ``[llamacpp]``) is not
  installed.

Usage: ``python bench/e2e_cpu.py [--threads 2] [--prompt-len 128] [--new-tokens 64] [--pte FILE]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def bench_fxport(pte: Path, prompt_len: int, new_tokens: int, threads: int) -> tuple[float, float]:
    from fxport.cli import bench_pte

    r = bench_pte(pte, prompt_len, new_tokens, threads)
    return r["prefill_tok_s"], r["decode_tok_s"]


def bench_transformers(gguf: Path, prompt_len: int, new_tokens: int, threads: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len + new_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :prompt_len])  # warm-up
        t0 = time.perf_counter()
        out = model(ids[:, :prompt_len], use_cache=True)
        t_prefill = time.perf_counter() - t0
        past = out.past_key_values
        t0 = time.perf_counter()
        for i in range(prompt_len, prompt_len + new_tokens):
            out = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
        t_decode = time.perf_counter() - t0
    return prompt_len / t_prefill, new_tokens / t_decode


def bench_llamacpp(gguf: Path, prompt_len: int, new_tokens: int, threads: int) -> tuple[float, float] | str:
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed (pip install 'fxport[llamacpp]'); column skipped"
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len, verbose=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, llm.n_vocab(), (prompt_len + new_tokens,), generator=g).tolist()
    llm.eval(ids[:prompt_len])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids[:prompt_len])
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in ids[prompt_len:]:
        llm.eval([tok])
    t_decode = time.perf_counter() - t0
    return prompt_len / t_prefill, new_tokens / t_decode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pte", type=Path, default=Path("build/gemma3-270m.pte"))
    p.add_argument("--quant", default="8da4w")
    p.add_argument("--skip", nargs="*", default=[], choices=["fxport", "transformers", "llamacpp"])
    args = p.parse_args(argv)

    from fxport.models.gemma4.load import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    if "fxport" not in args.skip and not args.pte.exists():
        from fxport.cli import main as cli

        print(f"exporting {args.pte} ...", file=sys.stderr)
        rc = cli(["export", "--gguf", str(gguf), "--quant", args.quant, "--out", str(args.pte)])
        if rc:
            return rc

    rows: list[tuple[str, str, str]] = []
    notes: list[str] = []
    runs = [
        ("fxport", f"fxport XNNPACK .pte ({args.quant})", lambda: bench_fxport(args.pte, args.prompt_len, args.new_tokens, args.threads)),
        ("transformers", "transformers eager fp32", lambda: bench_transformers(gguf, args.prompt_len, args.new_tokens, args.threads)),
        ("llamacpp", "llama.cpp (llama-cpp-python)", lambda: bench_llamacpp(gguf, args.prompt_len, args.new_tokens, args.threads)),
    ]
    for key, label, run in runs:
        if key in args.skip:
            continue
        result = run()
        if isinstance(result, str):
            notes.append(f"{label}: {result}")
            rows.append((label, "-", "-"))
        else:
            rows.append((label, f"{result[0]:.1f}", f"{result[1]:.1f}"))
    print(f"Gemma 3 270M Q4_K_M GGUF, {args.threads} threads, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} decode steps, one run")
    print(f"{'runtime':<36} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for label, pre, dec in rows:
        print(f"{label:<36} {pre:>14} {dec:>13}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
