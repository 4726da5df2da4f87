"""XNNPACK lowering: ``{"prefill": ep, "decode": ep}`` -> one CPU ``.pte`` sharing its KV cache.

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

:func:`fxport.builder.build` drives these steps through this module's backend entry points
(:func:`validate`, :func:`quantize`, :func:`export`, :func:`run_passes`, :func:`lower`).

Recipes (the names ``quant=`` accepts) live in :mod:`fxport.lowering.xnnpack_quant`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.export import ExportedProgram

from fxport.lowering.dryrun import DelegationReport, delegation_report
from fxport.lowering.xnnpack_quant import (  # noqa: F401  (re-exported: the backend's recipe vocabulary)
    XNNPACK_RECIPES,
    QuantReport,
    XnnpackWeightQuant,
    quantize_for_xnnpack,
    recipe_names,
)

# ----------------------------------------------------------------------------- passes


def cpu_passes(model: nn.Module | None = None, *, windows: Mapping[str, int] | None = None,
               ring_size: int | None = None, last_token_logits: bool = True,
               xnnpack_rewrites: bool = True, max_prefill_chunk: int | None = None) -> dict[str, list]:
    """The CPU pass set per method: ``{"prefill": [...], "decode": [...]}``.

    * ``RingBufferKVCache`` when the model has sliding-window caches (windows from
      ``fxport.models.gemma4.model.sliding_window_buffers(model)`` or ``windows=``);
    * ``AdditiveAttentionMask``, ``SDPAAsMatmul``, ``RMSNormAsLinear`` and ``SymbolicViewAsInferred``
      (:mod:`fxport.passes.xnnpack`) when ``xnnpack_rewrites``: patterns XNNPACK would
      otherwise leave to portable kernels (each one left out splits a delegate); on prefill also
      ``RotateHalfAsLinear`` (decode's static slices are delegated as they are);
    * ``LastTokenLogits`` on prefill (decode is already length 1) when ``last_token_logits``.
    No Triton dispatch: XNNPACK cannot run fxport's Triton ops; the multimodal fusion is only
    needed for programs exported with ``multimodal=True`` and is added by the caller then.
    """
    from fxport.passes.last_token_logits import LastTokenLogits
    from fxport.passes.xnnpack import (
        AdditiveAttentionMask,
        RMSNormAsLinear,
        RotateHalfAsLinear,
        SDPAAsMatmul,
        SymbolicViewAsInferred,
    )

    common: list = []
    if windows is None and model is not None:
        from fxport.models.gemma4.model import sliding_window_buffers

        windows = sliding_window_buffers(model)
    if windows:
        from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache

        common.append(RingBufferKVCache(windows=windows, ring_size=ring_size, max_prefill_chunk=max_prefill_chunk))
    if xnnpack_rewrites:
        common += [AdditiveAttentionMask(), SDPAAsMatmul(), RMSNormAsLinear(), SymbolicViewAsInferred()]
    prefill_only = [RotateHalfAsLinear()] if xnnpack_rewrites else []
    prefill = list(common) + prefill_only + ([LastTokenLogits()] if last_token_logits else [])
    return {"prefill": prefill, "decode": list(common)}


# ----------------------------------------------------------------------------- lowering


@dataclass
class XnnpackProgram:
    """A lowered program: the ``.pte`` bytes, what XNNPACK took, and the cache names."""

    buffer: bytes
    report: DelegationReport
    mutable_buffers: list[str]
    methods: list[str]
    executorch_program: Any = None  # the serialized schema (execution plans), for inspection

    def save(self, path: str | Path) -> Path:
        """Write the program atomically (temporary file, fsync, rename)."""
        from fxport.fileio import write_bytes

        return write_bytes(path, self.buffer)

    def write(self, path: str | Path, *, sidecar: Path | None = None, fill_sidecar=None) -> list[Path]:
        """Write the program and replace its sidecar directory with it (see
        :func:`fxport.fileio.write_program`); returns the extra files written (none)."""
        from fxport.fileio import write_program

        write_program(path, self.buffer, sidecar=sidecar, fill_sidecar=fill_sidecar)
        return []


def _mutable_buffers(ep: ExportedProgram) -> list[str]:
    return sorted(ep.graph_signature.buffers_to_mutate.values())


def lower_to_xnnpack(
    programs: Mapping[str, ExportedProgram],
    *,
    constant_methods: Mapping[str, Any] | None = None,
    on_stage=None,
) -> XnnpackProgram:
    """Lower ``{method: ExportedProgram}`` to one XNNPACK ``.pte`` (see the module docstring).

    All methods must mutate the same buffers (same FQNs, shapes, dtypes): that is what lets
    them share one KV-cache allocation. Raises ValueError naming the method and buffers that
    differ. ``on_stage("serialize")`` is called between ``to_edge_transform_and_lower`` and
    ``to_executorch`` when given.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    if not programs:
        raise ValueError("lower_to_xnnpack: no methods given; pass {'prefill': ep, 'decode': ep}")
    _check_shared_buffers(programs)
    edge = to_edge_transform_and_lower(
        dict(programs),
        partitioner=[XnnpackPartitioner()],
        constant_methods=dict(constant_methods or {}),
        # fxport's passes emit plain ATen ops; torchao's quant ops are not core ATen.
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    report = delegation_report({m: edge.exported_program(m) for m in programs})
    if on_stage is not None:
        on_stage("serialize")
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            run_reinplace_pass=True,
        )
    )
    first = next((ep for ep in programs.values() if ep.graph_signature.buffers_to_mutate), next(iter(programs.values())))
    return XnnpackProgram(et.buffer, report, _mutable_buffers(first), list(programs), et.executorch_program)


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
# What :func:`fxport.builder.build` calls, in order: validate (before any work), quantize,
# export, run_passes, lower.

NAME = "xnnpack"
PROGRAM_SUFFIX = ".pte"


def validate(options: Any) -> None:
    """Refuse options this backend cannot build, before any work (ValueError, one line).

    ``options``: a :class:`fxport.builder.BuildOptions` (``quant``, ``dry_run`` ...).
    """
    names = recipe_names()
    if options.quant is not None and options.quant not in names:
        raise ValueError(f"unknown --quant recipe {options.quant!r} for --backend xnnpack; "
                         f"choose one of: {', '.join(names)}")
    if options.dry_run:
        raise ValueError("--dry-run is a --backend cuda option (a partition report without a GPU); "
                         "--backend xnnpack builds on this CPU: drop --dry-run")


def quantize(model: nn.Module, recipe: str) -> QuantReport:
    return quantize_for_xnnpack(model, recipe)


def export(model: nn.Module, options: Any) -> dict[str, ExportedProgram]:
    """prefill + decode in functional ATen IR (:func:`fxport.models.gemma4.export.export_methods`)."""
    from fxport.models.gemma4.export import export_methods

    with torch.no_grad():
        return export_methods(model, max_prefill_chunk=options.max_prefill_chunk)


def run_passes(model: nn.Module, programs: Mapping[str, ExportedProgram], options: Any):
    """The CPU pass set (:func:`cpu_passes`) over each method: ``(programs, {method: result})``."""
    return apply_method_passes(programs, cpu_passes(model, ring_size=options.ring_size,
                                                           max_prefill_chunk=options.max_prefill_chunk), dump=options.dump)


def lower(programs: Mapping[str, ExportedProgram], *, constant_methods: Mapping[str, Any] | None = None,
          on_serialize=None) -> XnnpackProgram:
    """:func:`lower_to_xnnpack`; ``on_serialize()`` is called when serialization starts."""
    return lower_to_xnnpack(programs, constant_methods=constant_methods,
                            on_stage=None if on_serialize is None else (lambda name: on_serialize()))


# ----------------------------------------------------------------------------- one call


def model_metadata(model: nn.Module, max_prefill_chunk: int) -> dict[str, int]:
    """Constant methods stored in the ``.pte``; see :func:`fxport.builder.model_metadata`."""
    from fxport.builder import model_metadata as _metadata

    return _metadata(model, max_prefill_chunk)


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    max_prefill_chunk: int = 128,
    quant: str | None = None,
    ring_size: int | None = None,
    dump: str | Path | None = None,
    on_stage=None,
):
    """Eager Gemma model -> XNNPACK ``.pte`` at ``out``: a thin wrapper over
    :func:`fxport.builder.build` (kept for existing callers; new code calls ``build``).

    Returns the :class:`fxport.builder.BuildResult` (``.out``, ``.quant_report``,
    ``.pass_results``, ``.report``, ``.metadata``, ``.summary()``). ``model`` is quantized in
    place when ``quant`` is given.
    """
    from fxport.builder import BuildOptions, Source, build

    options = BuildOptions(backend="xnnpack", quant=quant, max_seq_len=int(model.max_seq_len),
                           max_prefill_chunk=max_prefill_chunk, ring_size=ring_size,
                           dump=None if dump is None else str(dump))
    return build(Source(model=model), out, options, on_stage=on_stage)
