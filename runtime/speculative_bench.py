"""Measuring speculative decoding: plain vs speculative greedy generation of one prompt
(``fxport bench --speculative``; the grounded tasks and llama.cpp are in bench/speculative.py).

Above both :mod:`fxport.runtime.generate` and :mod:`fxport.runtime.speculative`: it calls
``generate`` with and without a drafter, so neither of those imports it.
"""

from __future__ import annotations

from typing import Any

from .generate import generate
from .speculative import Drafter

__all__ = ["BENCH_PROMPT", "compare_with_plain", "comparison_table"]


def compare_with_plain(backend: Any, tokenizer: Any, prompt: Any, max_new_tokens: int, drafter: Drafter,
                       repeats: int = 3) -> dict[str, Any]:
    """Greedy plain vs speculative generation of the same prompt, interleaved ``repeats`` times
    (A B A B ...): median decode tok/s of each (tokens after the first per second of decode
    loop), their ratio, the acceptance rate and tokens per target call, and whether the tokens
    are identical in every repetition."""
    import statistics

    plain_tps, spec_tps, identical = [], [], True
    stats = None
    for _ in range(repeats):
        a = generate(backend, tokenizer, prompt, max_new_tokens)
        b = generate(backend, tokenizer, prompt, max_new_tokens, speculative=drafter)
        plain_tps.append(a.decode_tok_s)
        spec_tps.append(b.decode_tok_s)
        identical &= a.tokens == b.tokens
        stats = b.speculative
    plain, spec = statistics.median(plain_tps), statistics.median(spec_tps)
    return {"plain_tok_s": plain, "spec_tok_s": spec, "ratio": spec / plain, "acceptance": stats.acceptance,
            "tokens_per_call": stats.tokens_per_call, "identical": identical, "generated": len(b.tokens),
            "prompt_tokens": len(b.prompt_tokens), "text": b.text, "stats": stats}


# ``fxport bench --speculative``'s prompt: a grounded task (a passage to repeat)
BENCH_PROMPT = (
    "Repeat the following passage exactly.\n\nThe river rises in the hills above the old mill town, "
    "runs south through farmland and forest for forty miles, and reaches the sea at a wide, shallow "
    "estuary where herons feed at low tide. In spring the water is high and brown with silt; by late "
    "summer it is clear enough to see the stones on the bottom.\n\nPassage:\n")


def comparison_table(label: str, r: dict[str, Any], how: str) -> str:
    """:func:`compare_with_plain`'s result as a one-row table with the load average."""
    import os

    load = os.getloadavg()
    return "\n".join([
        f"{'program':<40} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'accepted':>9} {'tok/call':>8} "
        f"{'same tokens':>11}",
        f"{label:<40} {r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} {r['ratio']:>6.2f} "
        f"{r['acceptance']:>9.0%} {r['tokens_per_call']:>8.2f} {str(r['identical']):>11}",
        f"(greedy, {r['prompt_tokens']} prompt tokens, {r['generated']} generated, medians of interleaved runs, "
        f"{how}, load average {load[0]:.2f} on {os.cpu_count()} cores)"])
