"""XNNPACK lowering: ``{method: ep}`` -> one CPU ``.pte`` (methods sharing one KV cache).

fxport's own programs have one method, ``prefill`` (L dynamic in [1, max_prefill_chunk]), which
also runs the decode steps (see ``METHODS``); programs with more methods (a multimodal program's
encoders, a separate ``decode``) share the KV-cache allocation.

Flow (each step usable alone):

1. :func:`quantize_for_xnnpack` (optional, on the eager model, before export): every
   ``nn.Linear`` a recipe selects becomes a torchao ``Int8DynamicActivationIntxWeightConfig``
   linear (int8 dynamic per-token activations, int4 group-wise or int8 per-channel symmetric
   weights). That is the form XNNPACK lowers to its ``qd8-f32-qb4w`` / ``qd8-f32-qc8w``
   GEMMs. Embeddings stay float (XNNPACK has no quantized gather; a gather reads one row per
   token, so it is not on the bandwidth-critical path).
2. ``torch.export`` + fxport's CPU passes (:func:`cpu_passes`: ring-buffer KV caches, fixed-slot
   fusion, last-token logits for prefill; never the Triton dispatches, which XNNPACK cannot run).
3. :func:`lower_to_xnnpack`: ``to_edge_transform_and_lower`` of both methods with
   ``XnnpackPartitioner``; ``to_executorch`` with
   ``MemoryPlanningPass(share_mutable_buffers=True)`` (every method reads and writes the same
   KV-cache allocation), ``emit_mutable_buffer_names=True`` (the cache keeps its FQN in the
   program) and the re-inplace pass (``index_put`` on a cache writes in place instead of
   copying the whole cache every step). Metadata such as ``max_seq_len`` is stored as constant
   methods (``get_max_seq_len`` ...), read back by :class:`fxport.runtime.pte_backend.PteBackend`.
   A program whose embedding lookup reads the same table as a linear XNNPACK runs (the
   ``balanced`` recipe's lookup from the int8 head) keeps its weights in a ``.ptd`` file beside the
   ``.pte`` (:func:`shared_tables`): XNNPACK stores its own copy of every weight it runs and the
   lookup (outside XNNPACK) needs the table too; inside one ``.pte`` those are two copies, in the
   weights file ExecuTorch's named-data store keeps identical bytes once.

:func:`fxport.builder.build` drives these steps through this module's backend entry points, the
:class:`fxport.lowering.backend.Backend` contract (:func:`validate`, :func:`quantize`,
:func:`run_passes`, :func:`dry_run`, :func:`lower`, then ``XnnpackProgram.write``).

Recipes (the names ``quant=`` accepts) live in :mod:`fxport.lowering.xnnpack_quant`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn
from torch.export import ExportedProgram

from fxport.contract import VERIFY
from fxport.lowering.dryrun import DelegationReport, delegation_report
from fxport.lowering.xnnpack_quant import (  # noqa: F401  (re-exported: the backend's recipe vocabulary)
    XNNPACK_RECIPES,
    QuantReport,
    XnnpackWeightQuant,
    quantize_for_xnnpack,
    recipe_names,
)

# ----------------------------------------------------------------------------- passes


def cpu_passes(*, windows: Mapping[str, int] | None = None,
               ring_size: int | None = None, last_token_logits: bool = True,
               xnnpack_rewrites: bool = True, max_prefill_chunk: int | None = None,
               verify: bool = False, custom_sdpa: bool = False) -> dict[str, list]:
    """The CPU pass set per method: ``{"prefill": [...], "decode": [...]}``.

    * ``RingBufferKVCache`` when there are sliding-window caches: ``windows`` maps each cache
      buffer FQN to its window (for fxport's Gemma,
      ``fxport.models.gemma4.model.sliding_window_buffers(model)``);
    * ``CustomSDPA`` when ``custom_sdpa`` (the builder's default for XNNPACK, off here): causal KV-cache attention as ExecuTorch's
      ``llama::custom_sdpa`` (in place, no cache copies; the program then needs ExecuTorch's LLM
      custom-op kernels, see :mod:`fxport.contract`, and a native runner ``OMP_NUM_THREADS=1``
      for reproducible logits: see :mod:`fxport.passes.xnnpack.custom_sdpa`);
    * ``QKNormRopeAsOne`` (after ``CustomSDPA``: a layer's query and key heads normalized and
      rotated as one tensor), ``GeluTanhAsSigmoid`` (XNNPACK serializes every GELU as the erf form), ``AdditiveAttentionMask``,
      ``SDPAAsMatmul``, ``RMSNormAsLinear`` and ``SymbolicViewAsInferred``
      (:mod:`fxport.passes.xnnpack`) when ``xnnpack_rewrites``: patterns XNNPACK would
      otherwise leave to portable kernels (each one left out splits a delegate); on prefill also
      ``RotateHalfAsLinear`` (decode's static slices are delegated as they are);
    * ``LastTokenLogits`` on prefill (decode is already length 1) when ``last_token_logits``;
    * last, ``EdgeDecompositions`` (:mod:`fxport.passes.edge_decompositions`): the ops
      ExecuTorch's edge conversion would decompose, already in their decomposed form, so
      :func:`lower_to_xnnpack` skips its two whole-program ``run_decompositions``.
    No Triton dispatch: XNNPACK cannot run fxport's Triton ops; the multimodal fusion is only
    needed for programs exported with ``multimodal=True`` and is added by the caller then.
    ``verify``: also ``"target_verify"`` (speculative decoding's verify method,
    :data:`fxport.contract.VERIFY`): prefill's set without ``LastTokenLogits``, the
    same pass objects (so its ring buffers get prefill's ring size and share its caches).
    """
    from fxport.passes.edge_decompositions import EdgeDecompositions
    from fxport.passes.last_token_logits import LastTokenLogits
    from fxport.passes.xnnpack import (
        AdditiveAttentionMask,
        GeluTanhAsSigmoid,
        QKNormRopeAsOne,
        RMSNormAsLinear,
        RotateHalfAsLinear,
        SDPAAsMatmul,
        SymbolicViewAsInferred,
    )

    common: list = []
    if windows:
        from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache

        common.append(RingBufferKVCache(windows=windows, ring_size=ring_size, max_prefill_chunk=max_prefill_chunk))
    if custom_sdpa:
        from fxport.passes.xnnpack.custom_sdpa import CustomSDPA

        common.append(CustomSDPA())
    if xnnpack_rewrites:
        common += [QKNormRopeAsOne()] if custom_sdpa else []  # its sites are custom_sdpa's
        common += [GeluTanhAsSigmoid(), AdditiveAttentionMask(), SDPAAsMatmul(), RMSNormAsLinear(), SymbolicViewAsInferred()]
    prefill_only = [RotateHalfAsLinear()] if xnnpack_rewrites else []
    prefill = list(common) + prefill_only + ([LastTokenLogits()] if last_token_logits else [])
    out = {"prefill": prefill + [EdgeDecompositions()], "decode": common + [EdgeDecompositions()]}
    if verify:  # speculative decoding: every token's logits (no LastTokenLogits)
        out[VERIFY] = list(common) + prefill_only + [EdgeDecompositions()]
    return out


# ----------------------------------------------------------------------------- lowering


@dataclass
class XnnpackProgram:
    """A lowered program: the ``.pte`` bytes, what XNNPACK took, and the cache names."""

    buffer: bytes
    report: DelegationReport
    mutable_buffers: list[str]
    methods: list[str]
    executorch_program: Any = None  # the serialized schema (execution plans), for inspection
    manager: Any = None  # the ExecutorchProgramManager, when the weights go to a .ptd file
    shared: list[str] = field(default_factory=list)  # tables stored once in the .ptd (shared_tables)

    def save(self, path: str | Path) -> Path:
        """Write the program (and its ``.ptd`` weights, when it has them) atomically."""
        self.write(path)
        return Path(path)

    def write(self, path: str | Path, *, sidecar: Path | None = None, fill_sidecar=None) -> list[Path]:
        """Publish the program, its weights file ``<stem>.ptd`` when it has one, and its sidecar
        directory as one set (:func:`fxport.fileio.write_program`: a reader sees the whole
        previous set or the whole new one); returns the extra files written. A ``<stem>.ptd`` of
        the previous program at ``path`` goes with it. A full disk while ExecuTorch writes the
        weights raises :class:`fxport.fileio.OutputWriteError` naming the ``.ptd``."""
        from fxport.fileio import no_space_error, staging_dir, write_program

        path = Path(path)
        ptd = path.with_name(path.stem + ".ptd")  # the name published beside the program
        if self.manager is None:
            write_program(path, self.buffer, sidecar=sidecar, fill_sidecar=fill_sidecar, owned=[ptd.name])
            return []
        with staging_dir(path.parent) as stage:
            try:
                self.manager.write_tensor_data_to_file(str(stage))
            except OSError as exc:
                err = no_space_error(exc, ptd)
                if err is exc:
                    raise
                raise err from exc
            written = sorted(stage.glob("*.ptd"))
            if [p.name for p in written] != [f"{WEIGHTS_TAG}.ptd"]:
                raise RuntimeError(f"expected one weights file {WEIGHTS_TAG}.ptd, ExecuTorch wrote {[p.name for p in written]}")
            written[0].rename(stage / ptd.name)
            write_program(path, self.buffer, sidecar=sidecar, fill_sidecar=fill_sidecar, beside=stage, owned=[ptd.name])
        return [ptd]


WEIGHTS_TAG = "weights"  # the named-data tag of the weights file (renamed to <stem>.ptd when written)


_LOOKUPS = ("embedding_byte", "embedding_4bit", "aten.embedding")


def shared_tables(programs: Mapping[str, ExportedProgram]) -> list[str]:
    """Constants read both by an embedding lookup (which XNNPACK does not run) and by another op
    (a tied head's linear, which it does): ``["method: placeholder", ...]``.

    Each would be stored twice in a ``.pte`` (XNNPACK's copy and the lookup's), once in a weights file.
    """
    found = []
    for method, ep in programs.items():
        sig = ep.graph_signature
        consts = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
        for node in ep.graph.nodes:
            if node.op != "placeholder" or node.name not in consts:
                continue
            lookups = [u for u in node.users if any(k in str(u.target) for k in _LOOKUPS)]
            if lookups and len(lookups) < len(node.users):
                found.append(f"{method}: {node.name}")
    return found


def _tagging_partitioner():
    """``XnnpackPartitioner`` that marks every constant XNNPACK serializes for the weights file."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class WeightsFilePartitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            # node_visitor reads meta["custom"]["delegate_constant_tag"] of the node it serializes
            # (a weight placeholder or the dequantize node reading it); other nodes ignore it.
            for node in exported_program.graph.nodes:
                if node.op in ("placeholder", "call_function"):
                    node.meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG
            return super().partition(exported_program)

    return WeightsFilePartitioner()


def _cache_views_partitioner(partitioner, cache_views: bool):
    """``partitioner``, leaving the K/V cache views outside XNNPACK when ``cache_views``."""
    from fxport.lowering.cache_views import cache_view_partitioner

    return cache_view_partitioner(partitioner) if cache_views else partitioner


def _mutable_placeholders(ep: ExportedProgram) -> set[str]:
    """Placeholder names of the buffers ``ep`` mutates (the KV caches: never weights-file data)."""
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    return {p for p, fqn in ep.graph_signature.inputs_to_buffers.items() if fqn in mutated}


def _mutable_buffers(ep: ExportedProgram) -> list[str]:
    return sorted(ep.graph_signature.buffers_to_mutate.values())


def lower_to_xnnpack(
    programs: Mapping[str, ExportedProgram],
    *,
    constant_methods: Mapping[str, Any] | None = None,
    on_stage=None,
    weights_file: bool | None = None,
    cache_views: bool = False,
) -> XnnpackProgram:
    """Lower ``{method: ExportedProgram}`` to one XNNPACK ``.pte`` (see the module docstring).

    All methods must mutate the same buffers (same FQNs, shapes, dtypes): that is what lets
    them share one KV-cache allocation. Raises ValueError naming the method and buffers that
    differ. ``on_stage("serialize")`` is called between ``to_edge_transform_and_lower`` and
    ``to_executorch`` when given. ``weights_file``: put
    the weights in a ``.ptd`` (True), keep them in the ``.pte`` (False), or decide by
    :func:`shared_tables` (None: a ``.ptd`` when a table would otherwise be stored twice).
    ``cache_views``: attention reads the K/V caches through zero-copy views outside XNNPACK
    instead of XNNPACK's ``Static Reshape`` copies (:mod:`fxport.lowering.cache_views`; same
    logits to the bit; off by default: on the 270M ``balanced`` step the copies' time moves to
    the attention ``bmm`` reading the cache, decode 1.00x).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from fxport.lowering.cache_views import CacheViewMemoryPlanning

    if not programs:
        raise ValueError("lower_to_xnnpack: no methods given; pass {'prefill': ep, 'decode': ep}")
    _check_shared_buffers(programs)
    shared = shared_tables(programs)
    external = bool(shared) if weights_file is None else weights_file
    edge = to_edge_transform_and_lower(
        dict(programs),
        partitioner=[_cache_views_partitioner(_tagging_partitioner() if external else XnnpackPartitioner(), cache_views)],
        constant_methods=dict(constant_methods or {}),
        # fxport's passes emit plain ATen ops; torchao's quant ops are not core ATen.
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    report = delegation_report({m: edge.exported_program(m) for m in programs})
    caches = {name for m in programs for name in _mutable_placeholders(edge.exported_program(m))}
    if on_stage is not None:
        on_stage("serialize")
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=(CacheViewMemoryPlanning if cache_views else MemoryPlanningPass)(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            run_reinplace_pass=True,
            # the constants left outside XNNPACK (the lookup's table) join the weights file
            external_constants=(lambda node: None if node.name in caches else WEIGHTS_TAG) if external else False,
        )
    )
    first = next((ep for ep in programs.values() if ep.graph_signature.buffers_to_mutate), next(iter(programs.values())))
    return XnnpackProgram(et.buffer, report, _mutable_buffers(first), list(programs), et.executorch_program,
                          manager=et if external else None, shared=shared)


def _buffer_shapes(ep: ExportedProgram) -> dict[str, tuple]:
    """{mutated buffer FQN: shape} read from the buffer placeholders' metadata."""
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    by_placeholder = ep.graph_signature.inputs_to_buffers
    out = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and by_placeholder.get(node.name) in mutated:
            val = node.meta.get("val")
            out[by_placeholder[node.name]] = tuple(val.shape) if val is not None else None
    return out


def _check_shared_buffers(programs: Mapping[str, ExportedProgram]) -> None:
    # Methods that mutate no buffer (a multimodal program's image / audio encoders) share nothing.
    mutating = {m: ep for m, ep in programs.items() if ep.graph_signature.buffers_to_mutate}
    if not mutating:
        return
    ref_name, ref = next(iter(mutating.items()))
    ref_bufs = _buffer_shapes(ref)
    for name, ep in mutating.items():
        bufs = _buffer_shapes(ep)
        if set(bufs) != set(ref_bufs):
            diff = sorted(set(bufs) ^ set(ref_bufs))
            raise ValueError(
                f"lower_to_xnnpack: methods {ref_name!r} and {name!r} mutate different buffers {diff[:4]}; "
                "export both methods from the same model and apply the same cache passes to both"
            )
        bad = sorted(n for n in bufs if bufs[n] != ref_bufs[n])
        if bad:
            raise ValueError(
                f"lower_to_xnnpack: buffer {bad[0]} has shape {bufs[bad[0]]} in {name!r} but {ref_bufs[bad[0]]} "
                f"in {ref_name!r}; shared caches need one shape (apply the same ring size to both methods)"
            )


def apply_method_passes(programs: Mapping[str, ExportedProgram], passes: Mapping[str, Sequence],
                        dump: str | Path | None = None) -> tuple[dict[str, ExportedProgram], dict]:
    """Run ``passes[method]`` over each method with :func:`fxport.passes.pipeline.apply`.

    Returns the rewritten programs and ``{method: PipelineResult}`` (for stats and dumps).
    """
    from fxport.passes.pipeline import apply

    out, results = {}, {}
    for method, ep in programs.items():
        res = apply(ep, passes.get(method, []), method=method, dump=dump)
        out[method], results[method] = res.ep, res
    return out, results


# ----------------------------------------------------------------------------- backend entry points
# The Backend contract (fxport.lowering.backend): validate (before any work), quantize, then
# (after the builder's backend-independent export) run_passes, lower (dry_run: not offered here).

NAME = "xnnpack"
PROGRAM_SUFFIX = ".pte"
# One method: prefill (L dynamic in [1, max_prefill_chunk]) also runs every decode step. XNNPACK
# resizes its runtime only when L changes, so a step through prefill at L = 1 costs what a
# decode method's step costs (16.0-16.7 ms both, on the 270M balanced program, logits equal to
# the last bit), and the program is exported, lowered and loaded once instead of twice (one
# packed copy of the weights at run time). ``PteBackend`` runs decode through prefill when the
# program has no decode method.
METHODS = ("prefill",)


def validate(options: Any) -> None:
    """Refuse options this backend cannot build, before any work (ValueError, one line).

    ``options``: any :class:`fxport.lowering.backend.BackendOptions` (``quant``, ``dry_run`` ...).
    """
    names = recipe_names()
    if options.quant is not None and options.quant not in names:
        raise ValueError(f"unknown --quant recipe {options.quant!r} for --backend xnnpack; "
                         f"choose one of: {', '.join(names)}")
    if options.dry_run:
        raise ValueError("--dry-run is a --backend cuda option (a partition report without a GPU); "
                         "--backend xnnpack builds on this CPU: drop --dry-run")


def quantize(model: nn.Module, recipe: str, tokenizer: Any = None) -> QuantReport:
    return quantize_for_xnnpack(model, recipe, tokenizer=tokenizer)


def run_passes(programs: Mapping[str, ExportedProgram], options: Any, *, windows: Mapping[str, int]):
    """The CPU pass set (:func:`cpu_passes`) over each method: ``(programs, {method: result})``."""
    return apply_method_passes(programs, cpu_passes(windows=windows, ring_size=options.ring_size,
                                                    max_prefill_chunk=options.max_prefill_chunk,
                                                    verify=VERIFY in programs,
                                                    custom_sdpa=getattr(options, "custom_sdpa", False)),
                              dump=options.dump)


def dry_run(programs: Mapping[str, ExportedProgram]):
    """Not offered: :func:`validate` refuses ``dry_run`` before any work (this backend builds on the CPU)."""
    raise ValueError("--dry-run is a --backend cuda option; --backend xnnpack builds on this CPU: drop --dry-run")


def lower(programs: Mapping[str, ExportedProgram], *, constant_methods: Mapping[str, Any] | None = None,
          on_serialize=None) -> XnnpackProgram:
    """:func:`lower_to_xnnpack`; ``on_serialize()`` is called when serialization starts."""
    return lower_to_xnnpack(programs, constant_methods=constant_methods,
                            on_stage=None if on_serialize is None else (lambda name: on_serialize()))
