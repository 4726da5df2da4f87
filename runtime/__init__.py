"""fxport runtime: the generate loop (chunked prefill, decode, samplers) over any Backend.

Floors, each importing only the ones below it: ``backend`` (the protocol and the shared errors)
<- ``pte_backend`` <- ``multimodal`` <- ``loader`` (:func:`open_program`) <- ``generate``.
"""

from .backend import Backend, ContextOverflowError, PteError, TokenIdError
from .generate import (
    EagerBackend,
    ExportedBackend,
    GenerationResult,
    as_backend,
    generate,
)
from .loader import open_program
from .samplers import Sampler, gumbel_max_sample

__all__ = [
    "Backend",
    "ContextOverflowError",
    "EagerBackend",
    "ExportedBackend",
    "GenerationResult",
    "PteError",
    "Sampler",
    "TokenIdError",
    "as_backend",
    "generate",
    "gumbel_max_sample",
    "open_program",
]
