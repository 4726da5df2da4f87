"""What a backend is, the errors every backend and the generate loop share, and what methods a
program file has (:func:`program_methods`, which backends and the loader choose by).

The bottom floor of :mod:`fxport.runtime`: at import it loads nothing of fxport (program_methods
imports ExecuTorch, ``fxport.fileio`` and ``runtime.native_log`` when called), so every other
runtime module (the loop in :mod:`~fxport.runtime.generate`, the ``.pte`` backends in
:mod:`~fxport.runtime.pte_backend` and :mod:`~fxport.runtime.multimodal`, the loader
:func:`fxport.runtime.loader.open_program`) imports it and none of them imports another to reach
these names. The protocol, as :func:`fxport.runtime.generate.generate` uses it:

    backend.max_seq_len         # positions the KV cache holds (None: unknown, not checked)
    backend.max_prefill_chunk   # longest chunk one prefill call accepts
    backend.prefill(tokens, input_pos) -> logits   # tokens (1, L) int64, input_pos (L,) int64
    backend.decode(token, input_pos) -> logits     # token (1, 1) int64, input_pos (1,) int64
    backend.reset()             # optional: called before a new sequence
    backend.vocab_size          # optional: ids the program knows; prompt ids are checked against it

Logits are ``(1, L', V)`` (or ``(1, V)``) float; only the last row is read, so a prefill that
returns last-token logits only (``L' = 1``) works as well as one returning all ``L``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from torch import Tensor

__all__ = ["Backend", "ContextOverflowError", "TokenIdError", "PteError", "check_token_ids", "constant_value",
           "program_methods"]


@runtime_checkable
class Backend(Protocol):
    """What :func:`fxport.runtime.generate.generate` needs from a model (see the module docstring)."""

    max_seq_len: int | None
    max_prefill_chunk: int

    def prefill(self, tokens: Tensor, input_pos: Tensor) -> Tensor: ...

    def decode(self, token: Tensor, input_pos: Tensor) -> Tensor: ...


class ContextOverflowError(ValueError):
    """The prompt plus the requested new tokens do not fit the backend's KV cache."""


class TokenIdError(ValueError):
    """A token id outside the program's vocabulary."""


class PteError(ValueError):
    """The file is not a fxport ``.pte`` this backend can run; the message says why."""


def check_token_ids(ids: Sequence[int] | Tensor, vocab_size: int | None, fix: str | None = None) -> None:
    """TokenIdError naming the first id outside ``[0, vocab_size)`` (None: not checked)."""
    if vocab_size is None:
        return
    vocab_size = int(vocab_size)
    if isinstance(ids, Tensor) and (not ids.numel() or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size)):
        return  # a step's ids: two reductions, no Python list
    flat = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else [int(i) for i in ids]
    for pos, i in enumerate(flat):
        if not 0 <= i < vocab_size:
            raise TokenIdError(
                f"token id {i} (prompt position {pos}) is outside the program's vocabulary of "
                f"{vocab_size} ids (0..{vocab_size - 1}); "
                + (fix or f"pass token ids below {vocab_size}.")
            )


def program_methods(path: str | Path, data_path: str | Path | None = None) -> set[str] | None:
    """Method names of the ExecuTorch program at ``path`` without loading any method, or None
    when ExecuTorch cannot read it as a program (the backend's own load then says why).

    data_path: its ``.ptd`` (default: ``<stem>.ptd`` beside it when that exists, as PteBackend).
    """
    from executorch.runtime import Runtime

    from fxport.fileio import weights_file
    from fxport.runtime.native_log import capture_native_stderr

    path = Path(path)
    if data_path is None and weights_file(path).is_file():
        data_path = weights_file(path)
    try:
        with capture_native_stderr():  # the runtime logs a failed load to fd 2
            return set(Runtime.get().load_program(path, data_path=data_path).method_names)
    except Exception:  # the runtime raises RuntimeError with a status code
        return None


def constant_value(program, name: str):
    """The value of constant method ``name`` of a loaded ExecuTorch ``program`` (its one output:
    a scalar as a Python number; ``get_eos_ids`` as a list), or None when the program has none."""
    from fxport import contract

    if name not in program.method_names:
        return None
    outs = program.load_method(name).execute([])
    values = [o.item() if isinstance(o, Tensor) and o.numel() == 1 else o for o in outs]
    return values if name == contract.EOS_IDS else values[0]
