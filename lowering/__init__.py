"""Lowering of fxport programs to ExecuTorch.

* :mod:`fxport.lowering.xnnpack`: CPU ``.pte`` (XNNPACK), one KV cache shared by prefill and
  decode. The whole pipeline (load -> quantize -> export -> passes -> lower -> save) is
  :func:`fxport.builder.build`; ``export_model`` is a thin wrapper over it.
* :mod:`fxport.lowering.cuda`: CUDA ``.pte`` + ``.ptd`` (CudaPartitioner / AOTInductor) and the
  CPU-only partition dry run ``cuda_dry_run``.
* :mod:`fxport.lowering.dryrun`: delegation reports (what a backend took, what it left).
* Compile time: the patches of upstream internals the build lowers under live in
  :mod:`fxport.builder.speedups`.
* ``PteBackend`` (the runtime's ``.pte`` backend) moved to :mod:`fxport.runtime.pte_backend`;
  the lazy name ``fxport.lowering.PteBackend`` still resolves there.
* :mod:`fxport.passes.last_token_logits` / :mod:`fxport.passes.xnnpack`: the CPU-side
  passes (last-token logits; rewrites that keep attention and norms inside XNNPACK).

Submodules import ExecuTorch lazily; importing this package is cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "export_model": "fxport.lowering.xnnpack",
    "lower_to_xnnpack": "fxport.lowering.xnnpack",
    "quantize_for_xnnpack": "fxport.lowering.xnnpack",
    "cpu_passes": "fxport.lowering.xnnpack",
    "cuda_dry_run": "fxport.lowering.cuda",
    "export_cuda": "fxport.lowering.cuda",
    "cuda_passes": "fxport.lowering.cuda",
    "delegation_report": "fxport.lowering.dryrun",
    "PteBackend": "fxport.runtime.pte_backend",
    "LastTokenLogits": "fxport.passes.last_token_logits",
    "AdditiveAttentionMask": "fxport.passes.xnnpack",
    "RMSNormAsLinear": "fxport.passes.xnnpack",
    "SDPAAsMatmul": "fxport.passes.xnnpack",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxport.lowering' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
