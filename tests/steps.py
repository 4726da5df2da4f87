"""Run a (prefill, decode) pair of exported programs as a runtime does: prefill in chunks, then
decode one token a step, on one set of mutable buffers (the KV caches).

Used by the pass tests and the foreign-graph tests to compare a rewritten pair with its
reference step by step::

    from fxport.tests.steps import run_steps
    logits = run_steps(programs, tokens, chunks=[5, 3])        # methods called as m(tokens, pos)
    logits = run_steps(programs, tokens, [5, 3], feed=hf_feed)  # or as their export script calls them
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.export import ExportedProgram

# feed(method, tokens (1, n), start) -> (args, kwargs) of one call of that method's module
Feed = Callable[[str, torch.Tensor, int], tuple[tuple, dict]]


def positions(method: str, tokens: torch.Tensor, start: int) -> tuple[tuple, dict]:
    """The default feed: ``method(tokens, arange(start, start + n))``."""
    return (tokens, torch.arange(start, start + tokens.shape[1])), {}


def mutated(ep: ExportedProgram) -> list[str]:
    """FQNs of the buffers the program writes (its KV caches and any other state)."""
    return sorted(set(ep.graph_signature.buffers_to_mutate.values()))


def run_steps(programs: dict[str, ExportedProgram], tokens: torch.Tensor, chunks: Sequence[int],
              feed: Feed = positions) -> list[torch.Tensor]:
    """Prefill ``chunks`` with "prefill", then decode the rest of ``tokens`` one at a time.

    Mutated buffers start at zero and are copied into each method's module before its call
    and back after it (``ep.module()`` holds its own copy). Returns the first output (the
    logits) of every call, detached.
    """
    modules = {m: ep.module() for m, ep in programs.items()}
    names = mutated(programs["decode"])
    assert names == mutated(programs["prefill"]), "prefill and decode write different buffers"
    state = {n: torch.zeros_like(dict(modules["decode"].named_buffers())[n]) for n in names}
    steps = [("prefill", n) for n in chunks] + [("decode", 1)] * (tokens.shape[1] - sum(chunks))
    outs, start = [], 0
    with torch.no_grad():
        for method, n in steps:
            buffers = dict(modules[method].named_buffers())
            for name, value in state.items():
                buffers[name].copy_(value)
            args, kwargs = feed(method, tokens[:, start:start + n], start)
            out = modules[method](*args, **kwargs)
            while isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.detach().clone())
            for name, value in state.items():
                value.copy_(buffers[name])
            start += n
    return outs
