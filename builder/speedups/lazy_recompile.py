"""Lazy recompile: generate a GraphModule's Python code when it is run or read, not at every edit.

``GraphModule.recompile()`` turns the graph into Python source and ``compile``s it (~5 ms for a
2,000-node Gemma graph). ExecuTorch's pass managers call it before and after every pass, every
ExportPass builds a new GraphModule (which recompiles in its constructor), and most of those
modules are never called: the next pass walks the graph with an ``Interpreter``, which reads
nodes, not code. cProfile of the 270M XNNPACK build: ~12,000 ``compile`` calls, ~16% of the
build in ``recompile``.

:class:`lazy_recompile` (a context manager around the build's graph work) makes a plain
GraphModule's ``recompile`` only mark the module stale, the way torch's own ``_LazyGraphModule``
does for the modules it builds: the code is generated on the first call of ``forward``, the first
read of ``.code`` / ``str()``, or a pickle (which needs the code object). The code generated then
is the code of the graph as it is at that moment, which is what an eager recompile after the
last edit gives; a module still stale when the context exits is compiled then, so nothing
outside it ever sees stale code. The patch is process-wide while the context is open (graph work
in other threads sees it too, with the same results). The program written is byte-identical
(``tests/builder/test_speedups.py``; the mechanism: ``tests/builder/speedups/test_lazy_recompile.py``).

What it patches (:func:`patched`): ``GraphModule.recompile``, ``.code``, ``__str__``,
``__reduce__`` and ``__reduce_package__``, checked first by :func:`probe` (parameters, the spec
fields the eager recompile keeps current, torch's own lazy module class); restored when the
context exits, also on an exception.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch.fx import GraphModule

from fxport.builder.speedups.probe import Mismatch, require, require_reads

NAME = "lazy_recompile"
_PATCHED = ("recompile", "code", "__str__", "__reduce__", "__reduce_package__")


def probe() -> None:
    """Raise :class:`fxport.builder.speedups.probe.Mismatch` unless GraphModule's code generation
    is shaped as this module was written against."""
    require("torch.fx:GraphModule.recompile", ("self",))
    require_reads("torch.fx:GraphModule.recompile", ("_PyTreeCodeGen", "_in_spec", "_out_spec", "forward"))
    if not isinstance(require("torch.fx:GraphModule.code"), property):
        raise Mismatch("torch.fx:GraphModule.code is not a property")
    require("torch.fx:GraphModule.__str__", ("self",))
    require("torch.fx:GraphModule.__reduce__", ("self",))
    require("torch.fx:GraphModule.__reduce_package__", ("self", "exporter"))
    require("torch.fx._lazy_graph_module:_LazyGraphModule")
    require("torch.fx.graph:_PyTreeCodeGen")


def patched() -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of everything the context replaces while open."""
    return [(GraphModule, name) for name in _PATCHED]
_eager = threading.local()  # depth of calls that need recompile()'s PythonCode (pickling)


def _lazy_forward(self: GraphModule, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``forward`` of a stale module: compile, then call the real code."""
    materialize(self)
    return self(*args, **kwargs)


def is_stale(gm: GraphModule) -> bool:
    """Whether ``gm``'s code has not been generated since its graph was last recompiled."""
    return type(gm).__dict__.get("forward") is _lazy_forward


_REAL_RECOMPILE = GraphModule.recompile
_materialized = 0  # stale modules compiled because their code was needed, in this process


def materialize(gm: GraphModule) -> None:
    """Generate ``gm``'s code now if it is stale (torch's eager ``recompile``)."""
    global _materialized
    if is_stale(gm):
        _materialized += 1
        _REAL_RECOMPILE(gm)


class lazy_recompile:
    """Context manager: plain GraphModules recompile lazily inside it (see the module docstring).
    ``deferred`` counts the recompiles deferred; ``compiled`` (complete after exit) the code
    generations that ran after all: modules called or read, pickles, torch's own lazy modules,
    and the stale modules compiled at exit."""

    def __enter__(self) -> "lazy_recompile":
        from torch.fx._lazy_graph_module import _LazyGraphModule
        from torch.fx.graph import _PyTreeCodeGen

        self._saved = {name: GraphModule.__dict__[name] for name in _PATCHED}
        self._stale: weakref.WeakSet = weakref.WeakSet()
        self.deferred = 0
        self.compiled = 0
        self._materialized_before = _materialized
        saved, stale = self._saved, self._stale

        def recompile(gm: GraphModule):
            if isinstance(gm, _LazyGraphModule) or getattr(_eager, "depth", 0):
                self.compiled += 1
                return _REAL_RECOMPILE(gm)  # torch's lazy module compiling for real; a pickle needs the code
            graph = gm._graph
            if isinstance(graph._codegen, _PyTreeCodeGen):  # read by the call wrapper, kept current
                gm._in_spec = graph._codegen.pytree_info.in_spec
                gm._out_spec = graph._codegen.pytree_info.out_spec
            type(gm).forward = _lazy_forward
            stale.add(gm)
            self.deferred += 1
            for child in gm.children():  # eager recompile recompiles GraphModule children too
                if isinstance(child, GraphModule):
                    child.recompile()
            return None

        def code(gm: GraphModule) -> str:
            materialize(gm)
            return saved["code"].fget(gm)

        def compiled_first(name: str):
            method = saved[name]

            def wrapper(gm: GraphModule, *args: Any, **kwargs: Any):
                materialize(gm)
                _eager.depth = getattr(_eager, "depth", 0) + 1
                try:
                    return method(gm, *args, **kwargs)
                finally:
                    _eager.depth -= 1

            return wrapper

        GraphModule.recompile = recompile
        GraphModule.code = property(code)
        for name in ("__str__", "__reduce__", "__reduce_package__"):
            setattr(GraphModule, name, compiled_first(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._saved.items():
            setattr(GraphModule, name, value)
        for gm in list(self._stale):  # nothing stale outlives the context
            materialize(gm)
        self._stale.clear()
        self.compiled += _materialized - self._materialized_before


__all__ = ["lazy_recompile", "materialize", "is_stale"]
