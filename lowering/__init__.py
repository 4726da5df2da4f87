"""Backends: fxport programs lowered to ExecuTorch, one module per backend.

Every backend keeps one contract, :class:`fxport.lowering.backend.Backend` (validate, quantize,
run_passes, dry_run / lower, then write), which :func:`fxport.builder.build` drives; a backend
imports neither ``fxport.builder`` nor ``fxport.models``.

* :mod:`fxport.lowering.xnnpack`: CPU ``.pte`` (XNNPACK), one KV cache shared by the methods;
  its recipes live in :mod:`fxport.lowering.xnnpack_quant`.
* :mod:`fxport.lowering.cuda`: CUDA ``.pte`` + ``.ptd`` (CudaPartitioner / AOTInductor) and the
  CPU-only partition dry run.
* :mod:`fxport.lowering.dryrun`: delegation reports (what a backend took, what it left).

The compile-time patches the builder lowers under live in :mod:`fxport.builder.speedups`.
Submodules import ExecuTorch lazily; importing this package is cheap.
"""
