"""Compile-time patches of upstream internals (ExecuTorch, torch, torchao) the build runs under.

Each removes work that cannot change the program: the bytes written are the same with and
without them (``tests/builder/test_speedups.py`` builds both ways and compares). On the Gemma 3
270M ``balanced`` build they take the build from ~4x the time down to ~55 s on 2 cores.

========================  ===========================================  ===========================
patch                     what it removes                              open around
========================  ===========================================  ===========================
:mod:`.quant_shape_rules` torchao's quant ops run in full to learn      export, passes, lowering
                          output shapes under fake tensors
:mod:`.lazy_recompile`    GraphModule code generated at every edit      passes, lowering
:mod:`.fewer_retraces`    edge-conversion re-traces and re-exports      lowering (and the dry run's
                          that cannot change the graph                  edge conversion)
:mod:`.faster_partitioner` the partitioner's merge check walking        lowering
                          generators instead of set operations
========================  ===========================================  ===========================

One switch, :class:`enabled` (``BuildOptions(speedups=...)``, ``fxport export --no-speedups``):
the builder opens it around its graph stages and opens each scope where the table says. Before
patching, each module's ``probe()`` checks the exact upstream names it replaces (presence,
parameters, and a version or method-set check where that is what makes the patch correct); on a
mismatch that patch stays off, with one :class:`SpeedupUnavailable` warning naming the symbol,
and the build runs ExecuTorch's plain path there: the same program, slower. Nothing outlives a
scope: every patched attribute (``patched()``) is the original again when it closes, also on an
exception, and the quant kernels are unregistered.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Any, Iterator

from fxport.builder.speedups.probe import Mismatch

SPEEDUPS = ("quant_shape_rules", "lazy_recompile", "fewer_retraces", "faster_partitioner")

_warned: set[str] = set()  # (patch: reason) already warned about in this process


class SpeedupUnavailable(UserWarning):
    """A speedup is off because an upstream name it patches changed (the build is still correct)."""


def _module(name: str):
    return importlib.import_module(f"fxport.builder.speedups.{name}")


def probe(name: str) -> str | None:
    """Why speedup ``name`` cannot run here (its first mismatch), or None when it can."""
    try:
        _module(name).probe()
    except Mismatch as exc:
        return str(exc)
    except ImportError as exc:  # the patch module itself imports an upstream name at import time
        return f"fxport.builder.speedups.{name} does not import ({exc})"
    return None


def patched() -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of every attribute a speedup replaces while its scope is open."""
    return [pair for name in ("lazy_recompile", "fewer_retraces", "faster_partitioner") for pair in _module(name).patched()]


class enabled:
    """The build's speedups, on or off: ``with enabled(options.speedups) as fast:``, then
    ``fast.fake_propagation()`` / ``fast.codegen()`` / ``fast.lowering()`` around those stages.

    Entering probes every speedup (when ``on``) and warns once per mismatch; a scope opens the
    speedups that passed (none when off). ``skipped``: after a lowering scope, what fewer_retraces
    skipped (``{"retrace": n, "run_decompositions": n, "run_decompositions ran": [graph sizes]}``;
    empty when it was off)."""

    def __init__(self, on: bool = True):
        self.on = bool(on)
        self.off: dict[str, str] = {}  # speedup -> why it is off (probe mismatch)
        self.skipped: dict[str, Any] = {}

    def __enter__(self) -> "enabled":
        self.off = {}
        if self.on:
            for name in SPEEDUPS:
                reason = probe(name)
                if reason is None:
                    continue
                self.off[name] = reason
                if f"{name}: {reason}" not in _warned:
                    _warned.add(f"{name}: {reason}")
                    warnings.warn(f"fxport speedup {name} is off: {reason}; the build runs ExecuTorch's plain path "
                                  f"there (the same program, slower)", SpeedupUnavailable, stacklevel=2)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def usable(self, name: str) -> bool:
        """Whether speedup ``name`` runs in its scope (switched on and its probe passed)."""
        return self.on and name not in self.off

    @contextlib.contextmanager
    def fake_propagation(self) -> Iterator[None]:
        """From export to lowering: torchao's quant ops answer fake propagation from shapes."""
        with _module("quant_shape_rules").quant_shape_rules() if self.usable("quant_shape_rules") else _nothing():
            yield

    @contextlib.contextmanager
    def codegen(self) -> Iterator[None]:
        """From the passes to lowering: GraphModules generate their code when run or read."""
        with _module("lazy_recompile").lazy_recompile() if self.usable("lazy_recompile") else _nothing():
            yield

    @contextlib.contextmanager
    def lowering(self) -> Iterator[None]:
        """Around a backend's lowering (or dry run): fused edge passes, fewer re-traces, the
        partitioner's merge check with set operations."""
        with contextlib.ExitStack() as stack:
            fewer = None
            if self.usable("fewer_retraces"):
                fewer = stack.enter_context(_module("fewer_retraces").fewer_retraces())
            if self.usable("faster_partitioner"):
                stack.enter_context(_module("faster_partitioner").faster_partitioner())
            try:
                yield
            finally:
                if fewer is not None:
                    self.skipped = dict(fewer.skipped)


def _nothing():
    return contextlib.nullcontext()
