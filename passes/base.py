"""The pass contract: an ExportedProgram in, a PassResult out.

Every fxport pass subclasses :class:`Pass` and implements :meth:`Pass.run`. The framework
(``Pass.__call__``) hands ``run`` a private copy of the program, so a pass may edit
``ep.graph`` in place; when ``run`` reports a change, the copy is re-traced
(:func:`fxport.passes.graph.retrace`) so node metadata, shapes and the graph signature are
fresh again, and validated. The caller's program is never mutated.

A pass:
  * matches conservatively: a node it cannot prove safe is left alone and counted in
    ``stats.skipped[reason]``;
  * is idempotent: running it on its own output changes nothing (``changed=False``);
  * takes its knobs (thresholds, windows, slot layouts) as constructor arguments, with
    defaults read from the graph, so it works on programs fxport did not export.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.export import ExportedProgram


@dataclass
class PassStats:
    """Counts a pass reports: what it matched, what it rewrote, what it skipped and why.

    ``sites`` holds one small dict per call site for passes that choose per site
    (shape, choice, reason), so dumps and the CLI can print them.
    """

    matched: int = 0
    rewritten: int = 0
    skipped: Counter = field(default_factory=Counter)
    sites: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "rewritten": self.rewritten,
            "skipped": dict(self.skipped),
            "sites": list(self.sites),
        }


@dataclass
class PassResult:
    ep: ExportedProgram
    changed: bool
    stats: PassStats


@dataclass
class PassContext:
    """What the pipeline knows about the program being rewritten.

    method: "prefill", "decode" or None (unknown); passes that dispatch per method read it,
        and fall back to shapes in the graph when it is None.
    """

    method: str | None = None


class PassError(ValueError):
    """A pass refused its input; the message names the offending node/buffer and the fix."""


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Pass:
    """Base class of all fxport passes. Subclasses implement :meth:`run`."""

    @property
    def name(self) -> str:
        return snake_case(type(self).__name__)

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, ep: ExportedProgram, ctx: PassContext | None = None) -> PassResult:
        from fxport.passes.graph import clone_program, retrace

        ctx = ctx or PassContext()
        result = self.run(clone_program(ep), ctx)
        if not result.changed:
            return PassResult(ep, False, result.stats)
        new_ep = retrace(result.ep)
        new_ep.validate()
        return PassResult(new_ep, True, result.stats)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
