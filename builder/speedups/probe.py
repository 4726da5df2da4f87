"""Probes of the upstream internals a speedup patches: present, and shaped as the patch expects.

A speedup replaces private names of ExecuTorch, torch or torchao with code shown to give the
same result *for the upstream code it was written against*. Before patching, it checks that code
is still there: each check raises :class:`Mismatch` naming the symbol and what differs, and
:func:`fxport.builder.speedups.enabled` then leaves that speedup off (ExecuTorch's plain path:
the same program, slower) with one warning.

Symbols are named ``"module:attr.attr"`` (``"executorch.exir.pass_base:_ExportPassBase.call"``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Iterable


class Mismatch(Exception):
    """An upstream symbol a speedup patches is missing or not shaped as the speedup expects."""


def resolve(symbol: str) -> Any:
    """The object named ``"module:attr.attr"``; :class:`Mismatch` when the module or an attribute is missing."""
    module, _, attrs = symbol.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise Mismatch(f"{module} does not import ({exc})") from None
    for attr in filter(None, attrs.split(".")):
        # a class's own dict first: a property or a plain function is what gets patched, not its bound form
        own = vars(obj).get(attr, _MISSING) if isinstance(obj, type) else _MISSING
        obj = own if own is not _MISSING else getattr(obj, attr, _MISSING)
        if obj is _MISSING:
            raise Mismatch(f"{symbol} is missing")
    return obj


_MISSING = object()


def require(symbol: str, params: Iterable[str] | None = None) -> Any:
    """``symbol``'s object; with ``params``, its parameter names must be exactly those, in order."""
    obj = resolve(symbol)
    if params is not None:
        params = tuple(params)
        try:
            got = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            raise Mismatch(f"{symbol} has no readable signature (expected ({', '.join(params)}))") from None
        if got != params:
            raise Mismatch(f"{symbol} takes ({', '.join(got)}), expected ({', '.join(params)})")
    return obj


def require_reads(symbol: str, names: Iterable[str]) -> None:
    """The function ``symbol`` reads each of ``names`` as a global (a patch of those module
    attributes reaches it)."""
    code = getattr(resolve(symbol), "__code__", None)
    if code is None:
        raise Mismatch(f"{symbol} is not a Python function")
    missing = [n for n in names if n not in code.co_names]
    if missing:
        raise Mismatch(f"{symbol} no longer reads {', '.join(missing)}")


def require_members(symbol: str, known: Iterable[str]) -> None:
    """The class ``symbol`` defines exactly the methods ``known`` (a new hook is a mismatch)."""
    cls = resolve(symbol)
    got = {k for k, v in vars(cls).items() if not k.startswith("__") and (callable(v) or isinstance(v, property))}
    extra, gone = sorted(got - set(known)), sorted(set(known) - got)
    if extra or gone:
        raise Mismatch(f"{symbol} methods changed: " + "; ".join(
            part for part in (extra and f"new {', '.join(extra)}", gone and f"gone {', '.join(gone)}") if part))


def require_version(distribution: str, series: str) -> None:
    """The installed ``distribution`` is a ``series`` release (``"0.18"``: 0.18.x)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        got = version(distribution)
    except PackageNotFoundError:
        raise Mismatch(f"{distribution} is not installed") from None
    if got != series and not got.startswith(series + "."):
        raise Mismatch(f"{distribution} {got} is installed; this speedup was checked against {series}.x")
