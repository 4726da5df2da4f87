"""open_program(path): the backend for a ``.pte`` file, text or multimodal, picked by its methods.

    backend = open_program("model.pte", num_threads=4)   # PteBackend or MultimodalPteBackend

A program with an encoder method (:data:`MULTIMODAL_METHODS`: ``image_encoder``,
``audio_encoder``, as ``fxport.builder.multimodal.export_multimodal_pte`` writes them) gets the
multimodal backend of :mod:`fxport.runtime.multimodal`; any other fxport program gets
:class:`~fxport.runtime.pte_backend.PteBackend`. Every file is first opened as a text program,
so a missing file, a file that is not an ExecuTorch program and an ExecuTorch program that
fxport did not write (no ``prefill`` method) all raise the one-line
:class:`~fxport.runtime.backend.PteError` of :class:`PteBackend`. A multimodal program is then
opened again as such (ExecuTorch's Python runtime cannot hand a loaded program to another
backend); the text backend is released first.

This module sits above both ``.pte`` backends and below the generate loop: ``pte_backend`` and
``multimodal`` import only :mod:`fxport.runtime.backend` for the shared names, so the runtime's
imports run one way (``generate -> loader -> multimodal -> pte_backend -> backend``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MULTIMODAL_METHODS", "open_program"]

MULTIMODAL_METHODS = ("image_encoder", "audio_encoder")


def open_program(path: str | Path, **kwargs: Any) -> Any:
    """The backend for the ``.pte`` at ``path``; ``kwargs`` go to the backend (``data_path``,
    ``num_threads``, ``verbose``: see :class:`~fxport.runtime.pte_backend.PteBackend`).

    Raises PteError (one line) for a file that is not a fxport program.
    """
    # imported on first use, so importing fxport.runtime stays as light as before
    from fxport.runtime.pte_backend import PteBackend

    backend = PteBackend(path, **kwargs)
    if not set(MULTIMODAL_METHODS) & set(backend.program.method_names):
        return backend
    del backend  # one loaded copy of the program at a time
    from fxport.runtime.multimodal import open_pte

    return open_pte(path, **kwargs)
