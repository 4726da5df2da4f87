"""fxport graph passes over ``torch.export.ExportedProgram`` (functional ATen IR).

``apply(ep, [FixedSlotFusion(), ...], method="prefill", dump="dumps/")`` runs passes in order
(see :mod:`fxport.passes.pipeline`). Pass classes are imported lazily, so a pass module that
is missing or fails to import does not break ``import fxport.passes`` (the error surfaces when
that pass is used).
"""

from __future__ import annotations

import importlib

from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats
from fxport.passes.pipeline import PassRecord, PipelineError, PipelineResult, apply, run_methods

# Public pass class -> module that defines it (imported on first attribute access).
_LAZY_PASSES = {
    "FixedSlotFusion": "fxport.passes.fixed_slot_fusion",
    "RingBufferKVCache": "fxport.passes.ring_buffer_kv_cache",
    "SDPADispatch": "fxport.passes.sdpa_dispatch",
    "Int4Dispatch": "fxport.passes.int4_dispatch",
    "LastTokenLogits": "fxport.passes.last_token_logits",
    "EdgeDecompositions": "fxport.passes.edge_decompositions",
    "AdditiveAttentionMask": "fxport.passes.xnnpack",
    "CustomSDPA": "fxport.passes.xnnpack",
    "GeluTanhAsSigmoid": "fxport.passes.xnnpack",
    "GeluTanhAsTanh": "fxport.passes.xnnpack",  # its name before 2026-12-05
    "QKNormRopeAsOne": "fxport.passes.xnnpack",
    "RMSNormAsLinear": "fxport.passes.xnnpack",
    "RotateHalfAsLinear": "fxport.passes.xnnpack",
    "SDPAAsMatmul": "fxport.passes.xnnpack",
    "SymbolicViewAsInferred": "fxport.passes.xnnpack",
}

__all__ = [
    "Pass",
    "PassContext",
    "PassError",
    "PassResult",
    "PassStats",
    "PassRecord",
    "PipelineError",
    "PipelineResult",
    "apply",
    "run_methods",
    *_LAZY_PASSES,
]


def __getattr__(name: str):
    module = _LAZY_PASSES.get(name)
    if module is None:
        raise AttributeError(f"module 'fxport.passes' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"fxport.passes.{name} is not available: {module} failed to import ({exc})") from exc
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_PASSES))
