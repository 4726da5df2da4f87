"""Partition reports: which nodes of a lowered program a backend took, and which it left.

After ``to_edge_transform_and_lower`` every node a partitioner accepted lives inside an
``executorch_call_delegate`` (a lowered submodule); every other compute node stays in the
top-level graph and runs on ExecuTorch's portable kernels. :func:`delegation_report` reads
that from an ``EdgeProgramManager`` (or one edge ``ExportedProgram``), so both lowerings can
say exactly what was not delegated:

* XNNPACK (:mod:`fxport.lowering.xnnpack`): cache writes (``index_put``), the embedding
  gather and mask construction are expected to stay outside the delegate.
* CUDA (:mod:`fxport.lowering.cuda`): the goal is *nothing* outside the delegate; the CUDA
  dry run (:func:`fxport.lowering.cuda.cuda_dry_run`) partitions on a machine without a GPU
  and reports the leftovers with this module.

Not counted as compute: placeholders, outputs, ``getitem`` on a delegate's tuple, the
delegate calls themselves, and symbolic-size bookkeeping (``sym_size``, ``sym_numel``).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch.export import ExportedProgram
from torch.fx import Node

# Targets that are graph bookkeeping, not compute a backend could take.
_BOOKKEEPING_NAMES = {"sym_size.int", "sym_numel.default", "sym_stride.int", "sym_storage_offset.default"}


def op_name(target: Any) -> str:
    """A short, stable name for a node target: ``aten.index_put.default``, ``operator.add``."""
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    ns = getattr(target, "namespace", None)
    if ns and not name.startswith(ns):
        name = f"{ns}.{name}"
    return name.replace("::", ".")


def _is_delegate_call(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"


def _is_bookkeeping(node: Node) -> bool:
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, str) and getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return True  # sym-int arithmetic (operator.mul on SymInts, ...)
    name = op_name(node.target)
    return any(name.endswith(b) for b in _BOOKKEEPING_NAMES)


@dataclass
class MethodReport:
    """Delegation of one method.

    delegates: number of ``executorch_call_delegate`` calls (lowered subgraphs).
    delegated_ops: histogram of the ops inside the lowered subgraphs (where readable).
    undelegated: ``(node name, op name)`` of every compute node left in the top-level graph.
    """

    method: str
    delegates: int = 0
    delegated_ops: Counter = field(default_factory=Counter)
    undelegated: list[tuple[str, str]] = field(default_factory=list)

    @property
    def undelegated_ops(self) -> Counter:
        return Counter(op for _, op in self.undelegated)

    @property
    def fully_delegated(self) -> bool:
        return not self.undelegated and self.delegates > 0

    def summary(self) -> str:
        inside = sum(self.delegated_ops.values())
        head = f"{self.method}: {self.delegates} delegate call(s), {inside} op(s) delegated, {len(self.undelegated)} not delegated"
        if not self.undelegated:
            return head
        rows = [f"    {n:4d} x {op}" for op, n in sorted(self.undelegated_ops.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join([head, *rows])


@dataclass
class DelegationReport:
    """One :class:`MethodReport` per method, in method order."""

    methods: dict[str, MethodReport] = field(default_factory=dict)

    @property
    def fully_delegated(self) -> bool:
        return all(m.fully_delegated for m in self.methods.values())

    def summary(self) -> str:
        return "\n".join(m.summary() for m in self.methods.values())

    def __getitem__(self, method: str) -> MethodReport:
        return self.methods[method]


def _delegated_ops(ep: ExportedProgram, node: Node) -> Counter:
    """Ops inside the lowered module called by ``node`` (empty when the backend hid them)."""
    counts: Counter = Counter()
    lowered = getattr(ep.graph_module, node.args[0].target, None)
    original = getattr(lowered, "original_module", None)
    if original is None:
        return counts
    for n in original.graph.nodes:
        if n.op == "call_function" and not _is_bookkeeping(n):
            counts[op_name(n.target)] += 1
    return counts


def method_report(ep: ExportedProgram, method: str = "forward") -> MethodReport:
    """Delegation report of one edge program (after partitioning)."""
    report = MethodReport(method)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if _is_delegate_call(node):
            report.delegates += 1
            report.delegated_ops.update(_delegated_ops(ep, node))
        elif not _is_bookkeeping(node):
            report.undelegated.append((node.name, op_name(node.target)))
    return report


def delegation_report(programs: Any) -> DelegationReport:
    """Report of an ``EdgeProgramManager``, a ``{method: edge ExportedProgram}`` dict or one program."""
    if isinstance(programs, ExportedProgram):
        items: Mapping[str, ExportedProgram] = {"forward": programs}
    elif isinstance(programs, Mapping):
        items = programs
    else:  # EdgeProgramManager
        items = {name: programs.exported_program(name) for name in programs.methods}
    return DelegationReport({name: method_report(ep, name) for name, ep in items.items()})
