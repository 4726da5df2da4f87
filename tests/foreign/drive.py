"""Drive a (prefill, decode) pair of exported programs and inspect their structure.

Used by every foreign-graph test: the programs come from someone else's export script, the
helpers only need to know how that ecosystem feeds one step (``feed``).

* :func:`compare` runs both pairs through :func:`fxport.tests.steps.run_steps` (chunked prefill,
  then token-by-token decode on shared buffers) and :func:`assert_same_logits` compares them
  step by step (relative error, fp32);
* the structure helpers read the rewritten graphs: cache lengths, split-K call sites and what
  they read, and K/V expansions left between a cache and its attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from fxport.passes import apply
from fxport.tests.steps import Feed, run_steps

aten = torch.ops.aten
SPLITK = "fxport.sdpa_decode_splitk.default"


def normalized(ep: ExportedProgram) -> ExportedProgram:
    """The unrewritten reference: the same normalization ``apply`` does, no pass."""
    return apply(ep, [], dump=False).ep


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_same_logits(got: list[torch.Tensor], expected: list[torch.Tensor], rel: float = 1e-5) -> None:
    """Step by step: same shapes, relative error <= ``rel`` (fp32: the ring and the split-K
    reference only reorder sums)."""
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"step {step}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        err = rel_error(g, e)
        assert err <= rel, f"step {step}: relative error {err:.3g} > {rel}"


def compare(reference: dict[str, ExportedProgram], rewritten: dict[str, ExportedProgram], feed: Feed,
            tokens: torch.Tensor, chunks: Sequence[int], rel: float = 1e-5) -> list[torch.Tensor]:
    """Run both pairs over the same steps and assert equal logits; returns the reference's."""
    expected = run_steps(reference, tokens, chunks, feed)
    assert_same_logits(run_steps(rewritten, tokens, chunks, feed), expected, rel)
    return expected


# ---------------------------------------------------------------------------- structure


def tensor(ep: ExportedProgram, fqn: str) -> torch.Tensor:
    """A parameter, buffer or lifted constant of ``ep`` by FQN."""
    if fqn in ep.state_dict:
        return ep.state_dict[fqn]
    return ep.constants[fqn]


def cache_lengths(ep: ExportedProgram, names: Sequence[str]) -> dict[str, int]:
    """{buffer: length of dim 2} for (B, H, S, D) caches."""
    return {n: tensor(ep, n).shape[2] for n in names}


def ring_size(window: int, chunk: int) -> int:
    """R = max(2W, W + C - 1): chunks up to C never overwrite a slot their own queries need."""
    return max(2 * window, window + chunk - 1)


def _buffer_nodes(ep: ExportedProgram, names: Sequence[str]) -> dict[Node, str]:
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target in names}
    return {n: by_arg[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in by_arg}


def calls(ep: ExportedProgram, target: str) -> list[Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target) == target]


def cache_of(ep: ExportedProgram, node: Node, names: Sequence[str]) -> str | None:
    """The cache buffer ``node`` is (or is written from), following first arguments back."""
    buffers = _buffer_nodes(ep, names)
    seen = 0
    while isinstance(node, Node) and seen < 32:
        if node in buffers:
            return buffers[node]
        if node.op != "call_function" or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


def splitk_reads(ep: ExportedProgram, names: Sequence[str]) -> list[dict[str, Any]]:
    """For each split-K call: the shapes of its K and V inputs and the caches they come from."""
    out = []
    for node in calls(ep, SPLITK):
        q, k, v = node.args[:3]
        out.append({
            "q": tuple(q.meta["val"].shape),
            "k": tuple(k.meta["val"].shape),
            "v": tuple(v.meta["val"].shape),
            "k_cache": cache_of(ep, k, names),
            "v_cache": cache_of(ep, v, names),
        })
    return out


_EXPANSIONS = ("aten.repeat_interleave.self_int", "aten.repeat_interleave.Tensor", "aten.expand.default",
               "aten.repeat.default")
_ATTENTION = ("aten.scaled_dot_product_attention.default", SPLITK, "fxport.sdpa.default")


def kv_expansions(ep: ExportedProgram, names: Sequence[str]) -> list[str]:
    """Ops that repeat/expand a cache on its way to attention (``op <- buffer``).

    Walks the readers of every cache buffer up to the attention ops (not past them)."""
    buffers = _buffer_nodes(ep, names)
    found, stack, seen = [], list(buffers), set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if str(user.target) in _EXPANSIONS:
                found.append(f"{user.target} <- {cache_of(ep, user, names)}")
            if str(user.target) not in _ATTENTION:
                stack.append(user)
    return found


def aten_sdpa_left(ep: ExportedProgram) -> int:
    return len(calls(ep, "aten.scaled_dot_product_attention.default"))
