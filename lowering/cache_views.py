"""K/V cache views outside XNNPACK: attention reads the cache in place, not a copy of it.

:class:`fxport.passes.xnnpack.SDPAAsMatmul` reads each cache through a static view
``view_copy(cache, [B * H_kv, S, D])`` (the 3-d operand of its ``bmm``). XnnpackPartitioner puts
that view inside the delegate that runs the attention, where XNNPACK executes it as
``Static Reshape``: a copy of the whole cache, per K and V, per layer, per step (on the 270M
``balanced`` program 36 copies of 1 MiB a step, 1.0-1.7 ms of a 15-27 ms step in the ETDump
profile). Measured there, the copies' time moves to the attention ``bmm`` (BMM 1.4-1.5 ms +
Static Reshape 1.4-1.6 ms before, BMM 3.5-3.7 ms after; decode 0.99-1.03x, interleaved): so
:func:`~fxport.lowering.xnnpack.lower_to_xnnpack` keeps it off by default. Outside a delegate, ExecuTorch's ``ReplaceViewCopyWithViewPass`` turns a static
``view_copy`` into ``memory.view``: an alias of the cache's storage, no copy; the delegate then
receives the 3-d cache as its input.

Two pieces, both used by :func:`fxport.lowering.xnnpack.lower_to_xnnpack`:

* :func:`untag_cache_views` (run on the partitioner's tagged program): a ``view_copy`` at a
  partition's input boundary (its input computed outside that partition) with a static shape,
  whose input is a mutable buffer (a cache) or the functional write of one (``index_put`` /
  ``index_copy`` of a mutable buffer), leaves the partition. Leaves alone views inside a
  partition, symbolic shapes, views of anything else, and a view that is a partition's only node.
* :class:`CacheViewMemoryPlanning` (ExecuTorch's ``MemoryPlanningPass`` plus one fix): the
  re-inplace pass makes the cache write ``index_put_``, whose result aliases the cache.
  ``ReplaceViewCopyWithViewPass`` builds the view's spec on that result's spec *before* memory
  planning aliases the result's spec to the cache's (``_alias_inplace_result_specs`` replaces
  ``node.meta["spec"]``), so the view is left pointing at a spec that is never planned nor
  written: the program reads garbage (NaN logits on the 270M balanced program; the tiny Gemma's
  logits off by 5.2 abs). This pass rebases every ``memory.view`` of an
  in-place result onto the spec of the input that result aliases, then plans as ExecuTorch does.

Invariant: the same program values; the views read the cache after its write, as before (the
emitted instruction order is the graph's; a view only sets a data pointer).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

# The functional cache writes a view may read (reinplaced to index_put_ by to_executorch).
_CACHE_WRITES = ("index_put", "index_copy")


def _op_name(node: torch.fx.Node) -> str:
    """``aten.view_copy.default`` (ATen or edge dialect) -> ``view_copy``; ``""`` for other targets."""
    op = getattr(node.target, "_op", node.target)  # an edge op wraps its ATen OpOverload
    schema = getattr(op, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def _mutable_placeholders(ep: ExportedProgram) -> set[str]:
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    return {p for p, fqn in ep.graph_signature.inputs_to_buffers.items() if fqn in mutated}


def _reads_cache(node: torch.fx.Node, caches: set[str]) -> bool:
    """``node`` is a mutable buffer (a cache) or the functional write of one."""
    if node.op == "placeholder":
        return node.name in caches
    return (node.op == "call_function" and _op_name(node) in _CACHE_WRITES and bool(node.args)
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder"
            and node.args[0].name in caches)


def untag_cache_views(ep: ExportedProgram, tag_key: str = "delegation_tag") -> list[str]:
    """Move static views of the caches at partition input boundaries out of their partitions
    (see the module docstring); the names of the views moved. Edits ``node.meta`` only."""
    caches = _mutable_placeholders(ep)
    sizes: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.meta.get(tag_key):
            sizes[node.meta[tag_key]] = sizes.get(node.meta[tag_key], 0) + 1
    moved = []
    for node in ep.graph.nodes:
        tag = node.meta.get(tag_key)
        if tag is None or node.op != "call_function" or _op_name(node) != "view_copy":
            continue
        src = node.args[0]
        val = node.meta.get("val")
        if (not isinstance(src, torch.fx.Node) or src.meta.get(tag_key) == tag or val is None
                or not all(isinstance(s, int) for s in val.shape) or not _reads_cache(src, caches)
                or sizes[tag] <= 1):
            continue
        del node.meta[tag_key]
        sizes[tag] -= 1
        moved.append(node.name)
    return moved


def cache_view_partitioner(base):
    """``base`` (an ``XnnpackPartitioner``) whose partitions leave the cache views outside
    (:func:`untag_cache_views`); the same object, its ``partition`` wrapped."""
    inner = base.partition

    def partition(exported_program):
        result = inner(exported_program)
        tagged = result.tagged_exported_program
        untag_cache_views(tagged)
        live = {n.meta.get("delegation_tag") for n in tagged.graph.nodes}
        result.partition_tags = {t: s for t, s in result.partition_tags.items() if t in live}
        return result

    base.partition = partition
    return base


def _rebase_views_of_inplace(graph_module: torch.fx.GraphModule) -> int:
    """Point the spec of every ``memory.view`` of an in-place op's result at the spec of the
    input that result aliases (what memory planning does to the result itself); the count."""
    from executorch.exir import memory
    from executorch.exir.memory_planning import _is_inplace_node
    from executorch.exir.operator.convert import output_to_aliased_input_map, unwrap_op_overload
    from executorch.exir.passes.replace_view_copy_with_view_pass import _ViewSpec

    count = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not memory.view:
            continue
        base = node.args[0]
        if not isinstance(base, torch.fx.Node) or not _is_inplace_node(base):
            continue
        aliased = output_to_aliased_input_map(unwrap_op_overload(base.target)._schema)
        if 0 not in aliased or aliased[0] >= len(base.args) or not isinstance(base.args[aliased[0]], torch.fx.Node):
            continue
        src = base.args[aliased[0]]
        node.meta["spec"] = _ViewSpec(src.meta["spec"], list(node.meta["val"].shape))
        count += 1
    return count


def _memory_planning_class():
    from executorch.exir.passes import MemoryPlanningPass

    class CacheViewMemoryPlanning(MemoryPlanningPass):
        """ExecuTorch's memory planning, after :func:`_rebase_views_of_inplace`."""

        def run(self, graph_module, graph_signature=None):
            for module in graph_module.modules():
                if isinstance(module, torch.fx.GraphModule):
                    _rebase_views_of_inplace(module)
            return super().run(graph_module, graph_signature)

    return CacheViewMemoryPlanning


def CacheViewMemoryPlanning(**kwargs):
    """A ``MemoryPlanningPass(**kwargs)`` that first rebases views of in-place results (see the
    module docstring)."""
    return _memory_planning_class()(**kwargs)


__all__ = ["CacheViewMemoryPlanning", "cache_view_partitioner", "untag_cache_views"]
