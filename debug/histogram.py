"""Op histograms of a graph and the delta between two of them.

An op's name is its ATen overload (``aten.masked_scatter.default``), the ``__name__`` of a
plain Python callable (``getitem``, ``sym_size``) or the higher-order op's name (``cond``).
Only ``call_function`` nodes are counted; placeholders, ``get_attr`` and the output are not.
"""

from __future__ import annotations

from collections import Counter
from typing import Union

import torch
from torch.export import ExportedProgram

GraphLike = Union[ExportedProgram, torch.fx.GraphModule, torch.fx.Graph]


def op_name(target) -> str:
    """Stable, readable name of a ``call_function`` target."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.add.Tensor"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return getattr(target, "__name__", None) or repr(target)  # operator.getitem -> "getitem"


def _graph(g: GraphLike) -> torch.fx.Graph:
    if isinstance(g, ExportedProgram):
        return g.graph
    if isinstance(g, torch.fx.GraphModule):
        return g.graph
    return g


def op_histogram(g: GraphLike) -> Counter:
    """``Counter`` of op name -> number of ``call_function`` nodes calling it."""
    return Counter(op_name(n.target) for n in _graph(g).nodes if n.op == "call_function")


def histogram_text(hist: Counter) -> str:
    """One ``count  op`` line per op, most frequent first, then the total."""
    if not hist:
        return "(no ops)\n"
    width = max(len(str(c)) for c in hist.values())
    lines = [f"{c:>{width}}  {op}" for op, c in sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append(f"{sum(hist.values()):>{width}}  total")
    return "\n".join(lines) + "\n"


def histogram_delta(before: Counter, after: Counter) -> dict[str, tuple[int, int]]:
    """Ops whose count changed: op -> (count before, count after)."""
    ops = set(before) | set(after)
    return {op: (before.get(op, 0), after.get(op, 0)) for op in sorted(ops) if before.get(op, 0) != after.get(op, 0)}


def delta_text(before: Counter, after: Counter) -> str:
    """Table of the ops whose count changed, ``+`` for new ones and ``-`` for removed ones.

    ``  before  after  delta  op``; the last line gives the totals.
    """
    delta = histogram_delta(before, after)
    header = f"{'before':>7} {'after':>7} {'delta':>7}  op"
    lines = [header]
    for op, (b, a) in sorted(delta.items(), key=lambda kv: (kv[1][1] - kv[1][0], kv[0])):
        lines.append(f"{b:>7} {a:>7} {a - b:>+7}  {op}")
    if not delta:
        lines.append("    (no change)")
    tb, ta = sum(before.values()), sum(after.values())
    lines.append(f"{tb:>7} {ta:>7} {ta - tb:>+7}  total")
    return "\n".join(lines) + "\n"
