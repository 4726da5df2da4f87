"""PteBackend: run a fxport ``.pte`` (methods ``prefill`` and ``decode``) with ExecuTorch.

The backend protocol of :mod:`fxport.runtime.generate`:

    backend.max_seq_len          # positions the KV cache holds
    backend.max_prefill_chunk    # longest token chunk one ``prefill`` call accepts
    backend.prefill(tokens, input_pos) -> logits   # tokens (1, L) int64, input_pos (L,) int64
    backend.decode(token, input_pos) -> logits     # token (1, 1) int64, input_pos (1,) int64
    backend.reset()                                # start a new sequence

Logits are float32 ``(1, L', vocab)``; ``L'`` is 1 when the program was exported with
last-token logits (fxport's default for prefill), else L. The caller reads ``[:, -1]``.

Both methods read and write one KV-cache allocation (the ``.pte`` was planned with
``share_mutable_buffers=True`` and the Python runtime gives host-only methods one set of
arenas), so a ``decode`` after a ``prefill`` sees the prompt. The cache's initial content is
whatever the allocation held: every position a query can see is written before it is read
(causal masks, ring buffers mask unwritten slots), so ``reset`` only rewinds bookkeeping.

Metadata comes from the constant methods the lowering stored (``get_max_seq_len``,
``get_max_prefill_chunk``, ``get_vocab_size``, ``get_bos_id``, ``get_eos_id``); a missing one
is None (or, for the two sizes, taken from the method's input shapes).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

METADATA_METHODS = ("get_max_seq_len", "get_max_prefill_chunk", "get_vocab_size", "get_bos_id", "get_eos_id")


class PteError(ValueError):
    """The file is not a fxport ``.pte`` this backend can run; the message says why."""


def set_num_threads(n: int) -> None:
    """Size ExecuTorch's CPU threadpool (XNNPACK and the portable kernels) to ``n`` threads."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(n))


class PteBackend:
    """A loaded ``.pte`` with ``prefill`` / ``decode`` methods (see the module docstring).

    path: the ``.pte`` file; data_path: its ``.ptd`` weights file when it has one (CUDA).
    num_threads: ExecuTorch threadpool size (None: leave as is).
    Raises PteError for a missing file, a file ExecuTorch cannot load, or a program without
    ``prefill`` and ``decode`` methods.
    """

    def __init__(self, path: str | Path, *, data_path: str | Path | None = None, num_threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise PteError(f"no such .pte file: {path}")
        with path.open("rb") as f:
            header = f.read(8)
        if len(header) < 8 or header[4:6] != b"ET":  # flatbuffer file identifier "ET12" at byte 4
            raise PteError(f"{path} is not a loadable ExecuTorch program (no 'ET' file identifier at byte 4)")
        from executorch.runtime import Runtime

        if num_threads is not None:
            set_num_threads(num_threads)
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):  # the runtime logs its reason; put it in the error
                self.program = Runtime.get().load_program(path, data_path=data_path)
        except Exception as exc:  # the runtime raises RuntimeError with a status code
            reason = " ".join(log.getvalue().split()) or f"{type(exc).__name__}: {exc}"
            raise PteError(f"{path} is not a loadable ExecuTorch program ({reason})") from None
        names = self.program.method_names
        missing = [m for m in ("prefill", "decode") if m not in names]
        if missing:
            raise PteError(f"{path} has no method(s) {missing} (methods: {sorted(names)}); export it with fxport")
        self.path = path
        self.metadata: dict[str, Any] = {m: self._constant(m) for m in METADATA_METHODS}
        self._prefill = self.program.load_method("prefill")
        self._decode = self.program.load_method("decode")
        prefill_in = self.program.metadata("prefill").input_tensor_meta(0).sizes()
        self.max_prefill_chunk = int(self.metadata["get_max_prefill_chunk"] or prefill_in[-1])
        self.max_seq_len = int(self.metadata["get_max_seq_len"] or 0) or None
        self.vocab_size = self.metadata["get_vocab_size"]
        self.bos_id = self.metadata["get_bos_id"]
        self.eos_id = self.metadata["get_eos_id"]

    def _constant(self, name: str) -> Any:
        if name not in self.program.method_names:
            return None
        out = self.program.load_method(name).execute([])[0]
        return out.item() if isinstance(out, torch.Tensor) else out

    def prefill(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits for a chunk: tokens (1, L) int64 with 1 <= L <= max_prefill_chunk."""
        L = tokens.shape[-1]
        if not 1 <= L <= self.max_prefill_chunk:
            raise ValueError(f"prefill chunk of {L} tokens; this .pte accepts 1..{self.max_prefill_chunk} per call")
        return self._prefill.execute([tokens.to(torch.long).contiguous(), input_pos.to(torch.long).contiguous()])[0]

    def decode(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits for one token: token (1, 1) int64, input_pos (1,) int64."""
        return self._decode.execute([token.to(torch.long).reshape(1, 1), input_pos.to(torch.long).reshape(1)])[0]

    def reset(self) -> None:
        """Start a new sequence (nothing to clear; see the module docstring)."""

    def __repr__(self) -> str:
        return f"PteBackend({str(self.path)!r}, max_seq_len={self.max_seq_len}, max_prefill_chunk={self.max_prefill_chunk})"
