"""Fewer re-traces: lower to ExecuTorch without the whole-program re-traces that cannot change it.

Where ``to_edge_transform_and_lower`` spends its time (cProfile of the 270M build; see
bench/export_time.py): re-tracing. Every ExportPass re-executes the whole graph under fake
tensors (~1.3 ms per node), and a Gemma program has ~2,200 nodes per method:

* the edge conversion runs eight re-tracing passes one after the other (normalize transpose,
  broken ops, scalar-to-tensor, sym-to-tensor, mixed types, op replacement, memory format ...),
  each touching a few nodes and re-tracing all of them;
* it re-functionalizes and re-decomposes (``run_decompositions``: a full re-export) programs that
  are already functional and, after fxport's ``EdgeDecompositions`` pass, hold no op to decompose;
* most of XNNPACK's 17 per-delegate passes match nothing in an LLM and still end in a re-trace.

:class:`fewer_retraces` (a context manager around the lowering) removes exactly the work that
cannot change the program:

1. **Fused passes.** Consecutive edge passes that change the graph only through
   ``call_operator`` run as one re-trace (:class:`FusedPasses`): each node goes through the
   passes' ``call_operator`` in order, each pass's ``super().call_operator`` handing it to the
   next instead of emitting it. A pass sees what it would have seen in its own re-trace: the
   ops, arguments and metadata the previous pass emitted. torch's view-to-view_copy pass, first
   in the conversion, swaps the targets in place instead (:class:`_ViewCopyInPlace`): the first
   fused run re-traces right after it. Eight re-traces of the whole program become two.
2. **Pure re-traces of a re-traced graph.** An ExportPass that overrides none of the re-trace
   hooks (called as the ``super().call`` at the end of an in-place pass) on a graph structurally
   identical to the output of the previous re-trace (pure or transforming: XNNPACK's
   DimOrderOpsRevert and ConstProp re-trace every delegate just before a pure one) would
   reproduce it: skipped. So is a transforming pass shown to have nothing to do on the graph
   (ConstProp without a node of constant inputs, DimOrderOpsRevert without a dim-order op).
3. **Decompositions with nothing to do.** ``run_decompositions(table)`` of a program that a
   ``run_decompositions`` already produced, with no mutating op, no composite op it must
   decompose and no op in ``table`` (size reads such as ``sym_size.int`` aside: they decompose
   into themselves): skipped, as upstream itself skips it on its other path
   (``contains_any_call_fn_target_op``). The first one always runs: its re-export also puts the
   program's constants in the order a re-export gives them (fxport's passes add constants
   elsewhere), and the order is what the serialized program lists; a re-export of a re-exported
   program keeps it. So a lowering runs one whole-program re-export per method instead of three,
   and writes the bytes ExecuTorch's own path writes.

Passes that transform in place, or while re-tracing with hooks other than ``call_operator``,
always run. The program written is the same: ``tests/builder/test_speedups.py`` and
``tests/lowering/test_xnnpack.py`` compare the bytes with ExecuTorch's own path (speedups off). On
the 270M balanced program: lowering 89.6 -> ~42 s with ``EdgeDecompositions``; 69.2 -> ~42 s from
this module's fusions alone, byte-identical ``.pte``.

What it patches (:func:`patched`), each checked first by :func:`probe` (presence, parameters, and
the exact method set of ExecuTorch's pass base classes: a new re-trace hook would make a "pure"
re-trace impure): ``_ExportPassBase.call``, ``ExportedProgram.run_decompositions`` and, in
``executorch.exir.program._program``, ``_get_aten_to_edge_passes``, ``OpReplacePass``,
``MemoryFormatOpsPass`` and ``ReplaceViewOpsWithViewCopyOpsPass`` (read by
``_generate_edge_program``). All are restored when the context exits, also on an exception.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch.export import ExportedProgram

from fxport.builder.speedups.probe import require, require_members, require_reads

NAME = "fewer_retraces"
_PASS_BASE = "executorch.exir.pass_base:_ExportPassBase"
_PROGRAM = "executorch.exir.program._program"
_EDGE_NAMES = ("_get_aten_to_edge_passes", "OpReplacePass", "MemoryFormatOpsPass", "ReplaceViewOpsWithViewCopyOpsPass")
# ExecuTorch 1.5's pass base classes, method by method: the re-trace hooks this module reasons about
# (_RETRACE_HOOKS) and their helpers. A method added upstream may be a new hook: then it is off.
_BASE_METHODS = ("ExportInterpreter", "ExportTracer", "_capture_symbolic_input_snapshots",
                 "_create_dummy_node_metadata", "_fx", "_validate_symbolic_input_snapshots", "call", "call_cond",
                 "call_getitem", "call_map", "call_operator", "call_scan", "call_size_operator",
                 "call_size_operator_all", "call_submodule", "call_sym", "call_while", "inputs", "on_attr", "output",
                 "placeholder", "should_preserve_symbolic_input_metadata")
_PASS_METHODS = ("ExportInterpreter", "ExportTracer", "call_delegate", "call_submodule")


def probe() -> None:
    """Raise :class:`fxport.builder.speedups.probe.Mismatch` unless every upstream name this
    module patches or relies on is there, shaped as it was written against."""
    require(f"{_PASS_BASE}.call", ("self", "graph_module"))
    require(f"{_PASS_BASE}._fx", ("self", "kind", "target", "args", "kwargs", "meta"))
    require(f"{_PASS_BASE}.call_operator", ("self", "op", "args", "kwargs", "meta"))
    require(f"{_PASS_BASE}.call_getitem", ("self", "value", "key", "meta"))
    require(f"{_PASS_BASE}.call_sym", ("self", "target", "args", "meta"))
    require_members(_PASS_BASE, _BASE_METHODS)
    require_members("executorch.exir.pass_base:ExportPass", _PASS_METHODS)
    require("torch.export:ExportedProgram.run_decompositions", ("self", "decomp_table", "decompose_custom_triton_ops"))
    require("executorch.exir.graph_module:contains_any_call_fn_target_op")
    for name in _EDGE_NAMES:
        require(f"{_PROGRAM}:{name}")
    require(f"{_PROGRAM}:_get_aten_to_edge_passes", ("config",))
    require_reads(f"{_PROGRAM}:_generate_edge_program", _EDGE_NAMES)
    require("torch._export.passes.replace_view_ops_with_view_copy_ops_pass:_NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS")
    require("torch._export.passes.replace_view_ops_with_view_copy_ops_pass:get_view_copy_of_view_op", ("schema",))
    require_reads("executorch.exir.passes.scalar_to_tensor_pass:ScalarToTensorPass.call", ("_modified",))
    require("executorch.exir.passes.const_prop_pass:ConstPropPass")
    require("executorch.exir.passes.memory_format_ops_pass:DimOrderOpsRevertPass")
    require("executorch.exir.passes.dim_order_ops_registry:MemoryFormatOpsMap")
    require("torch._export.utils:_is_cia_op")
    require("torch._export.utils:_is_preservable_cia_op")
    require("executorch.exir.dialects.edge._ops:EdgeOpOverload")


def patched() -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of everything the context replaces while open."""
    import executorch.exir.program._program as program
    from executorch.exir.pass_base import _ExportPassBase

    return [(_ExportPassBase, "call"), (ExportedProgram, "run_decompositions"),
            *((program, name) for name in _EDGE_NAMES)]


# ----------------------------------------------------------------------------- what a re-trace reads

_RETRACE_HOOKS = ("call_operator", "call_sym", "call_cond", "call_while", "call_map", "call_scan",
                  "call_getitem", "output", "placeholder", "call_submodule", "call_delegate", "on_attr",
                  "call_size_operator", "call_size_operator_all", "inputs")


def _graph_fingerprint(gm: Any) -> tuple:
    """The structure a re-trace reads: ops, targets and argument wiring, in order."""
    index: dict = {}
    rows = []

    def arg(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, arg(v)) for k, v in a.items()))
        return repr(a)

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        rows.append((node.op, str(node.target), arg(node.args), arg(node.kwargs)))
    return tuple(rows)


def _is_pure_retrace(pass_: Any) -> bool:
    from executorch.exir.pass_base import ExportPass

    cls = type(pass_)
    return all(getattr(cls, hook, None) is getattr(ExportPass, hook, None) for hook in _RETRACE_HOOKS)


def _folds_nothing(gm: Any) -> bool:
    """ConstPropPass folds a node whose tensor inputs are all constants (``get_attr``; in its
    re-trace those are real tensors, everything else fake): none here means it changes nothing."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            inputs = node.all_input_nodes
            if all(i.op == "get_attr" for i in inputs):  # also a node with no tensor input at all
                return False
    return True


def _reverts_nothing(gm: Any) -> bool:
    """DimOrderOpsRevertPass rewrites only dim-order ops (``_to_dim_order_copy`` ...)."""
    from executorch.exir.passes.dim_order_ops_registry import MemoryFormatOpsMap

    return not any(node.op == "call_function" and node.target in MemoryFormatOpsMap for node in gm.graph.nodes)


def _changes_nothing(pass_: Any, gm: Any) -> bool:
    """Whether a transforming pass provably leaves ``gm`` as a pure re-trace would (XNNPACK's
    per-delegate ConstProp and DimOrderOpsRevert, which rarely have anything to do)."""
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsRevertPass

    cls = type(pass_)
    if cls is ConstPropPass:
        return _folds_nothing(gm)
    if cls is DimOrderOpsRevertPass:
        return _reverts_nothing(gm)
    return False


# In the decomposition table, but decomposed into themselves (a dynamic program's size reads).
_SIZE_QUERIES = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
                 torch.ops.aten.sym_storage_offset.default}


def _has_composite(gm: Any) -> bool:
    """Whether ``gm`` calls a CompositeImplicitAutograd op that ``run_decompositions`` decomposes
    whatever its table says: one it cannot preserve (a view such as ``reshape``; a functional one
    such as ``linear`` or torchao's quant ops is kept unless the table lists it)."""
    from torch._export.utils import _is_cia_op, _is_preservable_cia_op

    return any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
               and node.target not in _SIZE_QUERIES and _is_cia_op(node.target)
               and not _is_preservable_cia_op(node.target) for node in gm.graph.nodes)


def _has_mutation(gm: Any) -> bool:
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


# ----------------------------------------------------------------------------- 1. fused passes

# Hooks a fusable pass must leave as ExportPass has them: it may change nodes only in call_operator.
_OTHER_HOOKS = tuple(h for h in _RETRACE_HOOKS if h != "call_operator") + ("_fx",)


def _call_wrappers() -> tuple[type, ...]:
    """Fusable passes that override ``call`` only to reset and report a flag around ``super().call``."""
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass

    return (ScalarToTensorPass,)


def fusable(pass_: Any) -> bool:
    """Whether ``pass_`` (an edge pass, or the wrapper ExecuTorch's pass managers put around it)
    changes the graph only through ``call_operator`` during its re-trace."""
    from executorch.exir.pass_base import ExportPass

    cls = type(pass_)
    if not isinstance(pass_, ExportPass) or cls.call_operator is ExportPass.call_operator:
        return False  # not a re-tracing pass, or a pure re-trace (handled by 2.)
    if any(getattr(cls, hook, None) is not getattr(ExportPass, hook, None) for hook in _OTHER_HOOKS):
        return False
    return "call" not in vars(cls) or cls in _call_wrappers()


@functools.lru_cache(maxsize=None)
def _fused_pass_class():
    """The ``FusedPasses`` class (defined on first use: executorch is imported lazily)."""
    from executorch.exir.dialects.edge._ops import EdgeOpOverload
    from executorch.exir.pass_base import ExportPass, _ExportPassBase

    class FusedPasses(ExportPass):
        """Several :func:`fusable` passes in one re-trace, in order (see the module docstring)."""

        def __init__(self, passes: list) -> None:
            super().__init__()
            self.passes = list(passes)

        def call(self, graph_module):
            # Pass i's super().call_operator(...) ends in its _fx("call_function", ...): routed to
            # pass i + 1's hook for that node kind; the last pass's to this pass's own _fx (emit).
            for i, pass_ in enumerate(self.passes):
                pass_._fx = self._route(self.passes[i + 1] if i + 1 < len(self.passes) else None)
                if hasattr(pass_, "_modified"):  # ScalarToTensorPass's flag, reset by its own call
                    pass_._modified = False
            try:
                return super().call(graph_module)
            finally:
                for pass_ in self.passes:
                    del pass_._fx

        def _route(self, nxt):
            def fx(kind, target, args, kwargs, meta):
                if kind != "call_function" or nxt is None:
                    return _ExportPassBase._fx(self, kind, target, args, kwargs, meta)
                if target is operator.getitem:
                    return nxt.call_getitem(args[0], args[1], meta)
                if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, EdgeOpOverload)):
                    return nxt.call_operator(target, args, kwargs, meta)
                return nxt.call_sym(target, args, meta)

            return fx

        def call_operator(self, op, args, kwargs, meta):
            return self.passes[0].call_operator(op, args, kwargs, meta)

        def __repr__(self) -> str:
            return f"FusedPasses({', '.join(type(p).__name__ for p in self.passes)})"

    return FusedPasses


def fuse_passes(passes: list) -> list:
    """``passes`` with every run of consecutive :func:`fusable` passes as one ``FusedPasses``."""
    FusedPasses = _fused_pass_class()
    out, run = [], []

    def flush() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else FusedPasses(run))
            run.clear()

    for p in passes:
        inner = getattr(p, "__wrapped__", p)  # ExecuTorch's pass managers wrap passes in functions
        if fusable(inner):
            run.append(inner)
            continue
        flush()
        out.append(p)
    flush()
    return out


class _JoinedPass:
    """Stands where a pass was that joined the FusedPasses before it: changes nothing."""

    def __call__(self, graph_module):
        from torch.fx.passes.infra.pass_base import PassResult

        return PassResult(graph_module, False)


class _ViewCopyInPlace:
    """torch's ReplaceViewOpsWithViewCopyOpsPass without its re-trace: the same target swap
    (``view`` -> ``view_copy``, ``_unsafe_view`` -> ``view_copy`` ...) done on the nodes in place.
    The edge conversion re-traces right after it (the first fused run), which recomputes the
    swapped nodes' metadata."""

    def __call__(self, graph_module):
        from torch._export.passes.replace_view_ops_with_view_copy_ops_pass import (
            _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS,
            get_view_copy_of_view_op,
        )
        from torch.fx.passes.infra.pass_base import PassResult

        for node in graph_module.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if node.target in _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS:
                node.target = _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS[node.target]
            elif (copy := get_view_copy_of_view_op(node.target._schema)) is not None:
                node.target = copy
        graph_module.recompile()
        return PassResult(graph_module, True)


class _fused_edge_passes:
    """Patch ExecuTorch's edge conversion (``_generate_edge_program``) to run its passes fused:
    the pre-op-replacement list through :func:`fuse_passes`, and its last fusable pass
    (RemoveMixedTypeOperators) with OpReplacePass and MemoryFormatOpsPass, which the conversion
    appends after that list, as one more FusedPasses."""

    def __enter__(self):
        import executorch.exir.program._program as program

        self._program = program
        self._saved = (program._get_aten_to_edge_passes, program.OpReplacePass, program.MemoryFormatOpsPass,
                       program.ReplaceViewOpsWithViewCopyOpsPass)
        get_passes, op_replace, memory_format, _ = self._saved
        FusedPasses = _fused_pass_class()
        state: dict[str, Any] = {}

        def fused_get_passes(config):
            state.clear()  # one conversion at a time: nothing carries over from the previous one
            pre, post = get_passes(config)
            pre = fuse_passes(pre)
            last = getattr(pre[-1], "__wrapped__", pre[-1]) if pre else None
            if last is not None and fusable(last):
                state["tail"] = last  # joins the op replacement below
                pre = pre[:-1]
            return pre, post

        def fused_op_replace():
            fused = FusedPasses(([state.pop("tail")] if "tail" in state else []) + [op_replace()])
            state["fused"] = fused
            return fused

        def fused_memory_format():
            fused = state.pop("fused", None)
            if fused is None:
                return memory_format()
            fused.passes.append(memory_format())
            return _JoinedPass()

        program._get_aten_to_edge_passes = fused_get_passes
        program.OpReplacePass, program.MemoryFormatOpsPass = fused_op_replace, fused_memory_format
        program.ReplaceViewOpsWithViewCopyOpsPass = _ViewCopyInPlace
        return self

    def __exit__(self, *exc) -> None:
        p = self._program
        (p._get_aten_to_edge_passes, p.OpReplacePass, p.MemoryFormatOpsPass,
         p.ReplaceViewOpsWithViewCopyOpsPass) = self._saved


# ----------------------------------------------------------------------------- 2. and 3., and the context manager


class fewer_retraces:
    """Context manager: fuse the edge passes, skip the re-traces and decompositions that cannot
    change the program (see the module docstring). ``skipped`` counts what was skipped."""

    def __enter__(self):
        from executorch.exir.graph_module import contains_any_call_fn_target_op
        from executorch.exir.pass_base import _ExportPassBase
        from torch.fx.passes.infra.pass_base import PassResult

        self._base, self._ep = _ExportPassBase, ExportedProgram
        self._call, self._decomp = _ExportPassBase.call, ExportedProgram.run_decompositions
        call, decomp = self._call, self._decomp
        self.skipped: dict[str, Any] = {"retrace": 0, "run_decompositions": 0, "run_decompositions ran": []}
        skipped = self.skipped

        def fewer_call(pass_, graph_module):
            retraced = getattr(graph_module, "_fxport_retraced", None)  # None: not a re-trace's output
            if (retraced is not None and (_is_pure_retrace(pass_) or _changes_nothing(pass_, graph_module))
                    and retraced == _graph_fingerprint(graph_module)):
                skipped["retrace"] += 1
                return PassResult(graph_module, False)
            result = call(pass_, graph_module)
            # any re-trace's output (a transforming pass's too) is reproduced by a pure re-trace
            result.graph_module._fxport_retraced = _graph_fingerprint(result.graph_module)
            return result

        def fewer_decompositions(ep, decomp_table=None, *args, **kwargs):
            if (getattr(ep, "_fxport_reexported", False) and decomp_table is not None and not args and not kwargs
                    and not _has_mutation(ep.graph_module) and not _has_composite(ep.graph_module)
                    and not contains_any_call_fn_target_op(ep.graph_module, set(decomp_table) - _SIZE_QUERIES)):
                skipped["run_decompositions"] += 1
                return ep
            skipped["run_decompositions ran"].append(len(ep.graph.nodes))  # graph sizes, for tests and profiling
            out = decomp(ep, decomp_table, *args, **kwargs)
            out._fxport_reexported = True
            return out

        _ExportPassBase.call = fewer_call
        ExportedProgram.run_decompositions = fewer_decompositions
        self._fused = _fused_edge_passes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._fused.__exit__(*exc)
        self._base.call = self._call
        self._ep.run_decompositions = self._decomp


