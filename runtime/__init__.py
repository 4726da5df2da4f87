"""fxport runtime: the generate loop (chunked prefill, decode, samplers) over any Backend."""

from .generate import (
    Backend,
    ContextOverflowError,
    EagerBackend,
    ExportedBackend,
    GenerationResult,
    as_backend,
    generate,
)
from .samplers import Sampler, gumbel_max_sample

__all__ = [
    "Backend",
    "ContextOverflowError",
    "EagerBackend",
    "ExportedBackend",
    "GenerationResult",
    "Sampler",
    "as_backend",
    "generate",
    "gumbel_max_sample",
]
