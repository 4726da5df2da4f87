"""The pass contract: an ExportedProgram in, a PassResult out.

Every fxport pass subclasses :class:`Pass` and implements :meth:`Pass.run`. The framework
(``Pass.__call__``) hands ``run`` a private copy of the program, so a pass may edit
``ep.graph`` in place; when ``run`` reports a change, the copy is updated
(:func:`fxport.passes.graph.update`: dead code removed, node metadata, shapes and the graph
signature's names refreshed by fake-tensor propagation, falling back to a full re-trace with
:func:`fxport.passes.graph.retrace`) and validated. The caller's program is never mutated.

A pass whose output only a full re-trace makes valid (it inserts in-place ops that must be
functionalized, or leaves shapes that only re-tracing re-derives) sets ``needs_retrace = True``
on its class or in its :class:`PassResult`.

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
    """What ``run`` returns; ``Pass.__call__`` fills ``refresh`` with how the program was
    updated after a change: ``"refresh"`` (fast fake-tensor propagation) or ``"retrace"``.

    needs_retrace: ask ``Pass.__call__`` for a full re-trace instead of the fast refresh.
    """

    ep: ExportedProgram
    changed: bool
    stats: PassStats
    needs_retrace: bool = False
    refresh: str | None = None


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
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Pass:
    """Base class of all fxport passes. Subclasses implement :meth:`run`.

    needs_retrace: class attribute; True makes every changing call re-trace fully
        (``run_decompositions``) instead of the fast metadata refresh.
    """

    needs_retrace: bool = False

    @property
    def name(self) -> str:
        return snake_case(type(self).__name__)

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, ep: ExportedProgram, ctx: PassContext | None = None) -> PassResult:
        from fxport.passes.graph import clone_program, snapshot, update

        ctx = ctx or PassContext()
        copy = clone_program(ep)
        before = snapshot(copy)
        result = self.run(copy, ctx)
        if not result.changed:
            return PassResult(ep, False, result.stats)
        since = before if result.ep.graph is before.graph else None
        # ExportedProgram's constructor (inside update) validates the new program.
        new_ep, how = update(result.ep, full=self.needs_retrace or result.needs_retrace, since=since)
        return PassResult(new_ep, True, result.stats, refresh=how)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
