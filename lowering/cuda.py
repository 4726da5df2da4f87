"""CUDA lowering: prefill + decode -> ExecuTorch ``CudaPartitioner`` (AOTInductor) ``.pte`` + ``.ptd``.

Flow:

1. :func:`quantize_for_cuda` (optional): linears to torchao's int4 weight-only form
   (``IntxWeightOnlyConfig(int4, PerGroup(g))`` exports as ``dequantize_affine + linear``), the
   pattern :class:`fxport.passes.int4_dispatch.Int4Dispatch` turns into one packed int4 weight
   with a GEMV for decode and dequant + mm for prefill.
2. ``torch.export`` and :func:`cuda_passes`: ring-buffer KV caches, :class:`SDPADispatch`
   (split-K decode / tiled Triton attention), :class:`Int4Dispatch`, last-token logits for
   prefill. fxport's kernels are ``torch.library.triton_op``s, which AOTInductor compiles
   into the delegate (it sees the Triton source, no fallback kernel needed).
3. :func:`lower_to_cuda` (needs a GPU): ``to_edge_transform_and_lower`` of both methods with
   one ``CudaPartitioner`` per method (its method-name compile spec), ``to_executorch`` with
   shared mutable buffers and buffer names, weights written to a ``.ptd`` next to the ``.pte``.

Without a GPU, the dry run (``build(..., BuildOptions(backend="cuda", dry_run=True))``, ``fxport
export --backend cuda --dry-run``) runs steps 1-2, then :func:`dry_run` converts each method to the edge dialect
the way ``to_edge_transform_and_lower`` does for this partitioner (no core-ATen
decomposition of ops the partitioner keeps), runs ``CudaPartitioner.partition`` and reports
(a) every compute node left untagged (the goal: none) and (b) every tagged op AOTInductor
could only run as a fallback kernel that ExecuTorch's CUDA runtime does not provide (ops
with no Inductor lowering or decomposition, not a ``triton_op``, and not in
``CudaBackend.get_supported_fallback_kernels()``), which would fail compilation on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.export import ExportedProgram

from fxport.lowering.dryrun import (DelegationReport, MethodReport, StateBytes, format_signature, input_signature,
                                    io_max_sizes, op_name, state_bytes)


def gpu_available() -> bool:
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- quant + passes


def quantize_for_cuda(model: nn.Module, recipe: str, *, group_size: int = 32) -> dict[str, str]:
    """Int4 weight-only quantization of the linears ``recipe`` selects (in place).

    ``recipe``: ``"int4"`` (every linear, including a tied head) or a name from
    :mod:`fxport.quant.recipe` (its 4-bit rules; 8-bit rules and embeddings stay float here,
    as Int4Dispatch only matches int4). Returns ``{linear FQN: description}``.
    """
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    if recipe == "int4":
        def pick(fqn: str):
            return group_size
    else:
        from fxport.quant.recipe import get_recipe

        qrecipe = get_recipe(recipe)
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)

        def pick(fqn: str):
            cfg = qrecipe.config_for(fqn, n_layers)
            return cfg.group_size if cfg is not None and cfg.bits == 4 else None

    chosen: dict[int, set[str]] = {}
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            g = pick(f"{name}.weight")
            if g and mod.in_features % g == 0:
                chosen.setdefault(g, set()).add(name)
                out[name] = f"int4 g{g} weight-only"
    for g, names in chosen.items():
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g)),
                  filter_fn=lambda m, fqn, names=names: fqn in names)
    return out


def cuda_passes(*, windows: Mapping[str, int] | None = None,
                ring_size: int | None = None, splitk_threshold: int = 2048,
                max_prefill_chunk: int | None = None) -> dict[str, list]:
    """The CUDA pass set per method: ring buffers (``windows``: {cache buffer FQN: window}), SDPA
    dispatch, int4 dispatch, last-token logits."""
    from fxport.passes.int4_dispatch import Int4Dispatch
    from fxport.passes.last_token_logits import LastTokenLogits
    from fxport.passes.sdpa_dispatch import SDPADispatch

    common: list = []
    if windows:
        from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache

        common.append(RingBufferKVCache(windows=windows, ring_size=ring_size, max_prefill_chunk=max_prefill_chunk))
    common += [SDPADispatch(threshold=splitk_threshold), Int4Dispatch()]
    return {"prefill": [*common, LastTokenLogits()], "decode": list(common)}


def cuda_partitioner(method: str):
    """A ``CudaPartitioner`` whose compile specs name ``method`` (one per method)."""
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.backends.cuda.cuda_partitioner import CudaPartitioner

    return CudaPartitioner([CudaBackend.generate_method_name_compile_spec(method)])


# ----------------------------------------------------------------------------- dry run


def inductor_coverage(target: Any) -> str:
    """How AOTInductor would compile one op: "lowered", "decomposed", "triton_op",
    "fallback-supported" (ExecuTorch's CUDA runtime has the shim) or "fallback-unsupported"."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import fallbacks, lowerings

    from executorch.backends.aoti.passes.replace_view_copy_with_view import _VIEW_TARGETS
    from executorch.backends.cuda.cuda_backend import CudaBackend

    # The backend turns slice_copy/select_copy/split_copy back into views before compiling.
    target = _VIEW_TARGETS.get(target, target)
    if not isinstance(target, torch._ops.OpOverload):  # EdgeOpOverload -> its aten OpOverload
        target = getattr(target, "_op", target)
    if not isinstance(target, torch._ops.OpOverload):
        return "lowered"  # python operators on sym ints, getitem
    supported = CudaBackend.get_supported_fallback_kernels()
    name = target._name  # e.g. "aten::_weight_int4pack_mm"
    base = name.split("::")[-1]
    overload = target._overloadname
    shim = f"at::_ops::{base if overload == 'default' else f'{base}_{overload}'}::call"  # ATen's C++ op name
    if _is_triton_op(target):
        return "triton_op"
    if target in fallbacks:  # Inductor has no codegen for it: an extern kernel at runtime
        return "fallback-supported" if shim in supported or name in supported else "fallback-unsupported"
    if target in lowerings or target.overloadpacket in lowerings:
        return "lowered"
    if target in select_decomp_table() or target in CudaBackend.get_decomposition_table():
        return "decomposed"
    if shim in supported or name in supported:
        return "fallback-supported"
    if target.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
        return "decomposed"
    return "fallback-unsupported"


def _is_triton_op(op: torch._ops.OpOverload) -> bool:
    """True for ops registered with ``torch.library.triton_op`` (Inductor traces their kernels)."""
    from torch._library.triton import triton_ops_to_kernels

    return op._name in triton_ops_to_kernels


@dataclass
class CudaDryRunReport:
    """Partition report per method plus the ops that would need an unsupported fallback,
    the methods' input signatures and the bytes of weights and KV cache (from shapes)."""

    delegation: DelegationReport
    fallback: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> {op: coverage}
    pass_results: dict = field(default_factory=dict)
    signatures: dict[str, list] = field(default_factory=dict)  # method -> [(input, shape, dtype)]
    state: StateBytes | None = None
    io: dict[str, dict] = field(default_factory=dict)  # method -> {"inputs"/"outputs": [(dtype, max sizes)]}
    contract: list[str] | None = None  # runner-contract problems ([] = ok); None until checked
    constant_methods: dict[str, Any] = field(default_factory=dict)  # what the contract was checked with

    def check_contract(self, constant_methods: Mapping[str, Any]) -> list[str]:
        """Check the program these methods and ``constant_methods`` (what the lowering stores,
        the builder's runner metadata) make against ExecuTorch's LLM-runner contract
        (:func:`fxport.contract.contract_problems`); the summary prints the result."""
        from fxport.contract import contract_problems

        self.constant_methods = dict(constant_methods)
        names = [*self.delegation.methods, *constant_methods]
        self.contract = contract_problems(names, constant_methods,
                                          {m: io["inputs"] for m, io in self.io.items()},
                                          {m: io["outputs"] for m, io in self.io.items()})
        return self.contract

    @property
    def unsupported(self) -> dict[str, list[str]]:
        return {m: sorted(op for op, c in ops.items() if c == "fallback-unsupported") for m, ops in self.fallback.items()}

    @property
    def fully_delegated(self) -> bool:
        return self.delegation.fully_delegated and not any(self.unsupported.values())

    def summary(self) -> str:
        lines = ["CUDA dry run (partition only; AOTInductor compilation needs a GPU)"]
        for method, res in self.pass_results.items():
            lines.extend(f"[{method}] {line}" for line in res.summary().splitlines())
        if self.signatures:
            lines.append(f"methods: {', '.join(self.signatures)}")
            lines.extend(f"    {m}({format_signature(rows)})" for m, rows in self.signatures.items())
        for method, rep in self.delegation.methods.items():
            tagged = sum(rep.delegated_ops.values())
            lines.append(f"{method}: {tagged} node(s) delegated to CudaBackend in {rep.delegates} partition(s), "
                         f"{len(rep.undelegated)} not delegated")
            lines.extend(f"    not delegated: {name} ({op})" for name, op in rep.undelegated)
            bad = self.unsupported.get(method, [])
            if bad:
                lines.append(f"    ops AOTInductor would need an unsupported fallback kernel for: {', '.join(bad)}")
        if self.state is not None:
            lines.append(self.state.summary())
        if self.contract is not None:
            lines.append("constant methods: " + ", ".join(f"{k}={v}" for k, v in self.constant_methods.items()))
            lines.append("runner contract: ok" if not self.contract else
                         f"runner contract: {len(self.contract)} problem(s)")
            lines.extend(f"    {problem}" for problem in self.contract)
        lines.append("result: " + ("every node delegated" if self.fully_delegated else "NOT fully delegated (see above)"))
        return "\n".join(lines)


def partition_report(programs: Mapping[str, ExportedProgram]) -> CudaDryRunReport:
    """Run ``CudaPartitioner.partition`` on the edge form of each method (no compilation)."""
    from executorch.exir import EdgeCompileConfig, to_edge

    delegation = DelegationReport()
    fallback: dict[str, dict[str, str]] = {}
    for method, ep in programs.items():
        partitioner = cuda_partitioner(method)
        keep, _ = partitioner.ops_to_not_decompose(ep)
        edge = to_edge(
            {method: ep},
            compile_config=EdgeCompileConfig(_check_ir_validity=False, preserve_ops=keep),
        )
        edge_ep = edge.exported_program(method)
        result = partitioner.partition(edge_ep)
        tagged = result.tagged_exported_program
        rep = MethodReport(method, delegates=len(result.partition_tags))
        coverage: dict[str, str] = {}
        for node in tagged.graph.nodes:
            if node.op != "call_function":
                continue
            name = op_name(node.target)
            if "delegation_tag" in node.meta:
                rep.delegated_ops[name] += 1
                coverage.setdefault(name, inductor_coverage(node.target))
            else:
                rep.undelegated.append((node.name, name))
        delegation.methods[method] = rep
        fallback[method] = coverage
    return CudaDryRunReport(delegation, fallback, signatures={m: input_signature(ep) for m, ep in programs.items()},
                            state=state_bytes(programs), io={m: io_max_sizes(ep) for m, ep in programs.items()})


# ----------------------------------------------------------------------------- backend entry points
# The Backend contract (fxport.lowering.backend): validate (before any work), quantize, then (after
# the builder's backend-independent export) run_passes, then dry_run (no GPU) or lower.

NAME = "cuda"
PROGRAM_SUFFIX = ".pte"
# The methods the program has: Int4Dispatch and SDPADispatch give decode (L_q = 1) other kernels
# than prefill, so each is its own method.
METHODS = ("prefill", "decode")
INT4_RECIPE = "int4"


def recipe_names() -> list[str]:
    """Every name ``quant=`` accepts here: ``int4`` and :mod:`fxport.quant.recipe`'s recipes
    (their 4-bit rules; Int4Dispatch only matches int4)."""
    from fxport.quant.recipe import RECIPES

    return sorted({INT4_RECIPE, *RECIPES})


def validate(options: Any) -> None:
    """Refuse options this backend cannot build, before any work (ValueError, one line)."""
    names = recipe_names()
    if options.quant is not None and options.quant not in names:
        raise ValueError(f"unknown --quant recipe {options.quant!r} for --backend cuda; "
                         f"choose one of: {', '.join(names)}")
    if not options.dry_run and not gpu_available():
        raise ValueError("--backend cuda compiles with AOTInductor on a CUDA GPU and none is visible; "
                         "add --dry-run for the partition report on this machine")


def quantize(model: nn.Module, recipe: str, tokenizer: Any = None) -> dict[str, str]:
    """``tokenizer`` is unused: the CUDA recipes need no calibration text."""
    return quantize_for_cuda(model, recipe)


def run_passes(programs: Mapping[str, ExportedProgram], options: Any, *, windows: Mapping[str, int]):
    """The CUDA pass set (:func:`cuda_passes`) over each method: ``(programs, {method: result})``."""
    from fxport.lowering.xnnpack import apply_method_passes

    return apply_method_passes(programs, cuda_passes(windows=windows, ring_size=options.ring_size,
                                                     max_prefill_chunk=options.max_prefill_chunk), dump=options.dump)


def dry_run(programs: Mapping[str, ExportedProgram]) -> "CudaDryRunReport":
    return partition_report(programs)


@dataclass
class CudaProgram:
    """A compiled CUDA program: the ``.pte`` bytes and the manager that writes its ``.ptd``."""

    buffer: bytes
    manager: Any
    report: Any = None

    def write(self, path: str | Path, *, sidecar: Path | None = None, fill_sidecar=None) -> list[Path]:
        """Write the ``.ptd`` weights beside ``path``, then the program and its sidecar atomically
        (the weights are staged in a temporary folder and renamed in with the program)."""
        from fxport.fileio import staging_dir, write_program

        path = Path(path)
        with staging_dir(path.parent) as stage:
            self.manager.write_tensor_data_to_file(str(stage))
            ptd = sorted(path.parent / p.name for p in stage.glob("*.ptd"))
            write_program(path, self.buffer, sidecar=sidecar, fill_sidecar=fill_sidecar, beside=stage)
        return ptd


def lower(programs: Mapping[str, ExportedProgram], *, constant_methods: Mapping[str, Any] | None = None,
          on_serialize=None) -> CudaProgram:
    """Compile both methods with AOTInductor (needs a GPU); the program is written by ``write``."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    if not gpu_available():
        raise RuntimeError("lower: no CUDA GPU; AOTInductor compiles on the GPU. Use the dry run on CPU.")
    edge = to_edge_transform_and_lower(
        dict(programs),
        partitioner={m: [cuda_partitioner(m)] for m in programs},
        constant_methods=dict(constant_methods or {}),
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    )
    if on_serialize is not None:
        on_serialize()
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True, alloc_graph_input=False),
            emit_mutable_buffer_names=True,
            do_quant_fusion_and_const_prop=True,
        )
    )
    return CudaProgram(et.buffer, et)


# ----------------------------------------------------------------------------- real lowering (GPU)


def lower_to_cuda(programs: Mapping[str, ExportedProgram], out: str | Path, *,
                  constant_methods: Mapping[str, Any] | None = None) -> tuple[Path, list[Path]]:
    """Compile both methods with AOTInductor into ``out`` (.pte) and its ``.ptd`` weights. Needs a GPU."""
    out = Path(out)
    ptd = lower(programs, constant_methods=constant_methods).write(out)
    return out, ptd
