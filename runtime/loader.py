"""open_program(path): the backend for a ``.pte`` file, text or multimodal, picked by its methods.

    backend = open_program("model.pte", num_threads=4)   # PteBackend or MultimodalPteBackend

The program's method names are read first (:func:`fxport.runtime.backend.program_methods`: the
program's table only, no method is loaded; well under a millisecond on a 100 MB program). A program with any of
:data:`MULTIMODAL_METHODS` gets the multimodal backend of :mod:`fxport.runtime.multimodal`
(``image_encoder`` / ``audio_encoder``, as ``fxport.builder.multimodal`` writes them; ExecuTorch
``MultimodalRunner``'s ``token_embedding`` / ``text_decoder`` / ``vision_encoder``); any other
file goes to :class:`~fxport.runtime.pte_backend.PteBackend`. So a missing file, a file that is
not an ExecuTorch program and an ExecuTorch program fxport did not write (no ``prefill``) all
raise PteBackend's one-line :class:`~fxport.runtime.backend.PteError`.

This module sits above both ``.pte`` backends and below the generate loop; ``pte_backend`` and
``multimodal`` reach the shared names (``program_methods`` too) through
:mod:`fxport.runtime.backend` only, never through this module, so the runtime's imports run one
way (``generate -> loader -> multimodal -> pte_backend -> backend``; ``tests/test_layers.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxport.runtime.backend import program_methods

__all__ = ["MULTIMODAL_METHODS", "open_program"]

# fxport's merged-prefill layout, then the rest of ExecuTorch's MultimodalRunner layout
# (extension/llm/runner/constants.h; audio_encoder is in both)
MULTIMODAL_METHODS = ("image_encoder", "audio_encoder", "token_embedding", "text_decoder", "vision_encoder")


def open_program(path: str | Path, **kwargs: Any) -> Any:
    """The backend for the ``.pte`` at ``path``; ``kwargs`` go to the backend (``data_path``,
    ``num_threads``, ``verbose``: see :class:`~fxport.runtime.pte_backend.PteBackend`).

    Raises PteError (one line) for a file that is not a fxport program.
    """
    path = Path(path)
    names = program_methods(path, kwargs.get("data_path")) if path.is_file() else None
    # the backends are imported on first use, so importing fxport.runtime stays as light as before
    if names and set(MULTIMODAL_METHODS) & names:
        from fxport.runtime.multimodal import open_pte

        return open_pte(path, **kwargs)
    from fxport.runtime.pte_backend import PteBackend

    return PteBackend(path, **kwargs)
