"""Small declarative patterns over torch.fx nodes (rewrites as data, in the tinygrad spirit).

A pattern describes a node and, recursively, its arguments; matching returns the captured
sub-nodes/values by name, or None::

    from fxport.passes.match import P, Any, Const, Through, match, find_all

    EQ = P(aten.eq.Scalar, Any("tokens"), Const(name="token_id"))
    MERGE = P(aten.masked_scatter, Any("embeds"), Through(VIEW_OPS, EQ), Any("feats"))
    for node, caps in find_all(ep.graph, MERGE):
        caps["tokens"], caps["token_id"], caps["feats"]   # Node, int, Node

Vocabulary:
  * ``P(ops, *args, name=, where=, exact=)``: a ``call_function`` node whose target is one of
    ``ops`` (an OpOverload, an OpOverloadPacket = any of its overloads, a Python callable, a
    tuple of those, or None = any op); ``args`` match ``node.args`` positionally (a prefix:
    trailing args are ignored unless ``exact=True``); ``where(node) -> bool`` adds a condition.
  * ``Any(name)``: anything (a node or a literal).
  * ``Const(value=, name=)``: a literal (not a Node), equal to ``value`` when given.
  * ``Through(ops, pattern)``: zero or more nodes of ``ops`` followed along their first
    argument, then ``pattern`` (e.g. unsqueeze/expand/view wrapping a mask).
  * ``Or(*patterns)``: the first alternative that matches.
  * ``Seq(*patterns)``: a list/tuple argument (e.g. ``aten.cat``'s tensors) of exactly that
    length, element by element.

Used by :mod:`fxport.passes.attention` (the repeat_kv chain), :mod:`fxport.passes.fixed_slot_fusion`
(the multimodal merge) and :mod:`fxport.passes.xnnpack.rotate_half_as_linear` (RoPE's rotate_half).

Graph walks: ``is_op(node, *ops)``, ``producers_through(node, ops)`` (follow first arguments
back through e.g. view ops), ``ancestors(nodes, stop)`` / ``descendants(nodes, stop)``.

A name captured twice must bind the same object both times (so ``P(aten.mul, Any("x"), Any("x"))``
matches ``x * x`` only). Patterns never mutate the graph.
"""

from __future__ import annotations

from typing import Any as _Any, Callable, Iterable, Iterator

import torch
from torch.fx import Graph, Node

Captures = dict[str, _Any]


def _targets(ops) -> tuple:
    if ops is None:
        return ()
    if isinstance(ops, (tuple, list, set, frozenset)):
        return tuple(ops)
    return (ops,)


def op_matches(target, ops: tuple) -> bool:
    """True if ``target`` is one of ``ops`` (an OpOverloadPacket covers all its overloads)."""
    for op in ops:
        if target is op or target == op:
            return True
        if isinstance(op, torch._ops.OpOverloadPacket) and getattr(target, "overloadpacket", None) is op:
            return True
    return False


def is_op(node: _Any, *targets) -> bool:
    """``node`` is a ``call_function`` Node calling one of ``targets`` (packets allowed)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    flat = tuple(t for ts in targets for t in _targets(ts))
    return op_matches(node.target, flat)


def producers_through(node: _Any, ops, *, single_user: bool = False) -> tuple[_Any, list[Node]]:
    """Follow ``node.args[0]`` back while the node calls one of ``ops``.

    Returns ``(source, chain)``: the first value that is not such a node, and the skipped nodes
    from ``node`` backwards. With ``single_user=True`` the walk also stops at a node with more
    than one user (so the chain can be erased safely).
    """
    chain: list[Node] = []
    ops = _targets(ops)
    while is_op(node, ops) and node.args and (not single_user or len(node.users) <= 1):
        chain.append(node)
        node = node.args[0]
    return node, chain


def descendants(nodes: Iterable[Node], stop: Iterable[Node] = ()) -> set[Node]:
    """Every node reachable from ``nodes`` through users, not entering ``stop``."""
    return _walk(nodes, set(stop), lambda n: n.users)


def ancestors(nodes: Iterable[Node], stop: Iterable[Node] = ()) -> set[Node]:
    """Every node ``nodes`` depend on through their inputs, not entering ``stop``."""
    return _walk(nodes, set(stop), lambda n: n.all_input_nodes)


def _walk(nodes, stop: set, step) -> set[Node]:
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        for m in step(stack.pop()):
            if m not in seen and m not in stop:
                seen.add(m)
                stack.append(m)
    return seen


class Pattern:
    """Base class: ``match(value, captures) -> bool`` (fills ``captures`` on success)."""

    name: str | None = None

    def match(self, value: _Any, captures: Captures) -> bool:  # pragma: no cover
        raise NotImplementedError

    def _capture(self, value: _Any, captures: Captures) -> bool:
        if self.name is None:
            return True
        if self.name in captures:
            return captures[self.name] is value or (not isinstance(value, Node) and captures[self.name] == value)
        captures[self.name] = value
        return True


class Any(Pattern):
    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, value, captures):
        return self._capture(value, captures)

    def __repr__(self):
        return f"Any({self.name!r})" if self.name else "Any()"


_NO_VALUE = object()


class Const(Pattern):
    def __init__(self, value: _Any = _NO_VALUE, name: str | None = None):
        self.value, self.name = value, name

    def match(self, value, captures):
        if isinstance(value, Node):
            return False
        if self.value is not _NO_VALUE and value != self.value:
            return False
        return self._capture(value, captures)

    def __repr__(self):
        return f"Const({'' if self.value is _NO_VALUE else self.value!r})"


class P(Pattern):
    def __init__(
        self,
        ops,
        *args: Pattern,
        name: str | None = None,
        where: Callable[[Node], bool] | None = None,
        exact: bool = False,
    ):
        self.ops, self.args, self.name, self.where, self.exact = _targets(ops), args, name, where, exact

    def match(self, value, captures):
        if not isinstance(value, Node) or value.op != "call_function":
            return False
        if self.ops and not op_matches(value.target, self.ops):
            return False
        if len(value.args) < len(self.args) or (self.exact and len(value.args) != len(self.args)):
            return False
        trial = dict(captures)
        for pat, arg in zip(self.args, value.args):
            if not pat.match(arg, trial):
                return False
        if self.where is not None and not self.where(value):
            return False
        if not self._capture(value, trial):
            return False
        captures.update(trial)
        return True

    def __repr__(self):
        ops = ",".join(str(o) for o in self.ops) or "*"
        return f"P({ops}{''.join(', ' + repr(a) for a in self.args)})"


class Through(Pattern):
    def __init__(self, ops, pattern: Pattern, name: str | None = None):
        self.ops, self.pattern, self.name = _targets(ops), pattern, name

    def match(self, value, captures):
        node = value
        while True:
            trial = dict(captures)
            if self.pattern.match(node, trial) and self._capture(value, trial):
                captures.update(trial)
                return True
            if not (is_op(node, self.ops) and node.args):
                return False
            node = node.args[0]

    def __repr__(self):
        return f"Through({len(self.ops)} ops, {self.pattern!r})"


class Or(Pattern):
    def __init__(self, *patterns: Pattern, name: str | None = None):
        self.patterns, self.name = patterns, name

    def match(self, value, captures):
        for pat in self.patterns:
            trial = dict(captures)
            if pat.match(value, trial) and self._capture(value, trial):
                captures.update(trial)
                return True
        return False


class Seq(Pattern):
    def __init__(self, *patterns: Pattern, name: str | None = None):
        self.patterns, self.name = patterns, name

    def match(self, value, captures):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.patterns):
            return False
        trial = dict(captures)
        for pat, item in zip(self.patterns, value):
            if not pat.match(item, trial):
                return False
        if not self._capture(value, trial):
            return False
        captures.update(trial)
        return True

    def __repr__(self):
        return f"Seq({', '.join(repr(p) for p in self.patterns)})"


def match(pattern: Pattern, value: _Any) -> Captures | None:
    """Captures of ``pattern`` on ``value``, or None when it does not match."""
    captures: Captures = {}
    return captures if pattern.match(value, captures) else None


def find_all(graph: Graph, pattern: Pattern, nodes: Iterable[Node] | None = None) -> Iterator[tuple[Node, Captures]]:
    """Every node of ``graph`` (in order) that ``pattern`` matches, with its captures.

    Collected before yielding, so the caller may rewrite the graph while iterating.
    """
    hits = []
    for node in list(nodes if nodes is not None else graph.nodes):
        caps = match(pattern, node)
        if caps is not None:
            hits.append((node, caps))
    return iter(hits)
