"""Partition reports: which nodes of a lowered program a backend took, and which it left.

After ``to_edge_transform_and_lower`` every node a partitioner accepted lives inside an
``executorch_call_delegate`` (a lowered submodule); every other compute node stays in the
top-level graph and runs on ExecuTorch's portable kernels. :func:`delegation_report` reads
that from an ``EdgeProgramManager`` (or one edge ``ExportedProgram``), so both lowerings can
say exactly what was not delegated:

* XNNPACK (:mod:`fxport.lowering.xnnpack`): cache writes (``index_put``), the embedding
  gather and mask construction are expected to stay outside the delegate.
* CUDA (:mod:`fxport.lowering.cuda`): the goal is *nothing* outside the delegate; the CUDA
  dry run (:func:`fxport.lowering.cuda.dry_run`) partitions on a machine without a GPU
  and reports the leftovers with this module.

Not counted as compute: placeholders, outputs, ``getitem`` on a delegate's tuple, the
delegate calls themselves, and symbolic-size bookkeeping (``sym_size``, ``sym_numel``).

What a program holds, read from shapes and dtypes only (so a meta-device program without
weights, as the 31B dry run builds, is measured exactly): :func:`state_bytes` splits the
tensors the methods read into weights (parameters, constants, buffers no method writes; one
copy per name, as methods share them by name) and mutable state (buffers a method writes back:
the KV caches); :func:`input_signature` gives each method's user inputs with symbolic sizes and
their ranges.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
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


# ----------------------------------------------------------------------------- what a program holds


@dataclass
class StateBytes:
    """Bytes of the tensors the methods read, by name: ``weights`` (read only) and ``mutable``
    (buffers written back, i.e. the KV caches), each ``{FQN: bytes}``, one entry per name."""

    weights: dict[str, int] = field(default_factory=dict)
    mutable: dict[str, int] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def mutable_bytes(self) -> int:
        return sum(self.mutable.values())

    def summary(self) -> str:
        return (f"weights: {len(self.weights)} tensors, {self.weight_bytes} bytes ({_gib(self.weight_bytes)}); "
                f"KV cache (mutable buffers): {len(self.mutable)} tensors, {self.mutable_bytes} bytes "
                f"({_gib(self.mutable_bytes)})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _nbytes(t: Any) -> int:
    return int(t.numel()) * t.element_size()  # shape x dtype: no values read (meta tensors work)


def state_bytes(programs: Mapping[str, ExportedProgram]) -> StateBytes:
    """Weights and mutable-buffer bytes of ``{method: program}``; a name two methods share
    counts once, and a buffer any method writes is mutable state."""
    out = StateBytes()
    written = {s.target for ep in programs.values() for s in ep.graph_signature.output_specs
               if s.kind == OutputKind.BUFFER_MUTATION}
    for ep in programs.values():
        for spec in ep.graph_signature.input_specs:
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                continue
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if t is None or not hasattr(t, "element_size"):
                continue
            (out.mutable if spec.target in written else out.weights)[spec.target] = _nbytes(t)
    return out


def input_signature(ep: ExportedProgram) -> list[tuple[str, tuple, Any]]:
    """``[(name, shape, dtype)]`` of the user inputs; a symbolic size is ``"s0<=128"`` style text
    (``"s0"`` alone when unbounded), from the program's range constraints."""
    ranges = {str(sym): r for sym, r in ep.range_constraints.items()}
    user = set(ep.graph_signature.user_inputs)
    rows = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not hasattr(val, "shape"):
            rows.append((node.name, (), type(val).__name__))
            continue
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(d)
                continue
            r = ranges.get(str(d))
            upper = getattr(r, "upper", None)
            bounded = upper is not None and getattr(upper, "is_finite", True) and str(upper) not in ("oo", "int_oo")
            dims.append(f"{d}<={int(upper)}" if bounded else str(d))
        rows.append((node.name, tuple(dims), val.dtype))
    return rows


def _upper(ep: ExportedProgram, dim: Any) -> int:
    """A size's largest value: itself, or its symbol's upper bound (``sys.maxsize`` when unbounded)."""
    if isinstance(dim, int):
        return dim
    import sys

    r = {str(sym): r for sym, r in ep.range_constraints.items()}.get(str(dim))
    upper = getattr(r, "upper", None)
    try:
        return int(upper)
    except (TypeError, ValueError, OverflowError):  # int_oo / no range: unbounded
        return sys.maxsize


def io_max_sizes(ep: ExportedProgram) -> dict[str, list[tuple[Any, tuple[int, ...]]]]:
    """``{"inputs": [(dtype, max sizes)], "outputs": [...]}`` of the user inputs and outputs, the
    form :func:`fxport.contract.contract_problems` reads (symbolic sizes at their upper bound)."""
    user_in = set(ep.graph_signature.user_inputs)
    user_out = list(ep.graph_signature.user_outputs)
    nodes = {n.name: n for n in ep.graph.nodes}

    def row(node: Node | None) -> tuple[Any, tuple[int, ...]]:
        val = node.meta.get("val") if node is not None else None
        if not hasattr(val, "shape"):
            return (type(val).__name__, ())
        return (val.dtype, tuple(_upper(ep, d) for d in val.shape))

    inputs = [row(n) for n in ep.graph.nodes if n.op == "placeholder" and n.name in user_in]
    return {"inputs": inputs, "outputs": [row(nodes.get(name)) for name in user_out if name is not None]}


def format_signature(rows: list[tuple[str, tuple, Any]]) -> str:
    """``tokens (1, s27<=8) int64, input_pos (s27<=8,) int64``."""
    def shape(dims: tuple) -> str:
        return "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"

    return ", ".join(f"{name} {shape(dims)} {str(dtype).replace('torch.', '')}" for name, dims, dtype in rows)
