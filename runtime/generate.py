"""The generation loop: chunked prefill, decode, sampling, stop conditions, streaming, tok/s.

One loop drives every form of the model through the small :class:`Backend` protocol of
:mod:`fxport.runtime.backend` (``max_seq_len``, ``max_prefill_chunk``, ``prefill``, ``decode``,
optional ``reset`` and ``vocab_size``; that module also holds the errors shared with the
backends). Only the last row of the logits is read, so a prefill that returns last-token logits
only works as well as one returning every position's.

Backends (in :mod:`fxport.runtime.eager_backend`, re-exported here): :class:`EagerBackend` (a
``Gemma4ForCausalLM`` or any module with the same call signature and ``max_seq_len``) and
:class:`ExportedBackend` (the ``{"prefill": ep, "decode": ep}`` pair of ``export_methods``, run
through ``ep.module()`` with the two modules sharing one set of weights and KV-cache buffers).
:func:`as_backend` accepts a ``.pte`` path too and opens
it with :func:`fxport.runtime.loader.open_program` (the text or the multimodal ``.pte`` backend).

Positions: the prompt occupies 0..n-1; generated token i (0-based) is fed at position n + i,
except the last one, which is never fed. So a prompt of n tokens with ``max_new_tokens`` m needs
``n + m - 1 <= max_seq_len`` positions; :func:`generate` checks this before running anything,
and checks every prompt id against ``backend.vocab_size`` (:class:`TokenIdError`): an id the
program does not know (another model's tokenizer, a stale sidecar, a typo in ``--prompt-ids``)
would otherwise index past the embedding table inside the runtime.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .backend import Backend, ContextOverflowError, TokenIdError, check_token_ids
from .eager_backend import EagerBackend, ExportedBackend  # re-exported: fxport.runtime.generate.EagerBackend
from .samplers import Sampler

__all__ = [
    "Backend",
    "EagerBackend",
    "ExportedBackend",
    "GenerationResult",
    "ContextOverflowError",
    "TokenIdError",
    "check_token_ids",
    "as_backend",
    "generate",
    "check_context",
]


def as_backend(program: Any, max_prefill_chunk: int | None = None) -> Backend:
    """A :class:`Backend` for ``program``: a backend (returned as is), an eager model, a
    ``{"prefill", "decode"}`` dict of ExportedPrograms, or a ``.pte`` path."""
    if isinstance(program, torch.nn.Module):
        if hasattr(program, "encode_images"):  # a multimodal Gemma4ForConditionalGeneration
            from .multimodal import MultimodalEagerBackend

            return MultimodalEagerBackend(program, max_prefill_chunk)
        return EagerBackend(program, max_prefill_chunk)
    if isinstance(program, Mapping):
        return ExportedBackend(program, max_prefill_chunk=max_prefill_chunk)
    if isinstance(program, (str, Path)) and str(program).endswith(".pte"):
        from .loader import open_program

        return open_program(program)
    if isinstance(program, Backend):
        return program
    raise TypeError(
        f"generate: cannot run a {type(program).__name__}; pass an eager model, the dict of "
        "export_methods, a .pte path or an object with prefill/decode/max_seq_len/"
        "max_prefill_chunk (the Backend protocol)."
    )


@dataclass
class GenerationResult:
    """Output and timing of one :func:`generate` call.

    tokens: generated ids (an end-of-generation id that stopped the loop is included).
    text: decoded generated text (special tokens skipped, cut before a stop string).
    stop_reason: "eos", "stop_token", "stop_string" or "max_new_tokens".
    prefill_s: wall time of all prefill chunks (forward calls); prefill_tok_s = prompt / that.
    decode_s: wall time of the decode calls plus their sampling; decode_tok_s = decode_steps /
        that (the first generated token comes from prefill and is not a decode step).
    """

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "max_new_tokens"
    prefill_chunks: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    speculative: Any = None  # fxport.runtime.speculative.SpeculativeStats of a speculative generation

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int | None) -> None:
    """ContextOverflowError unless ``prompt_len + max_new_tokens - 1 <= max_seq_len``."""
    if max_seq_len is None:
        return
    need = prompt_len + max_new_tokens - 1
    if prompt_len > max_seq_len:
        raise ContextOverflowError(
            f"generate: prompt of {prompt_len} tokens does not fit the program's context of "
            f"max_seq_len={max_seq_len} positions; shorten the prompt to fewer than {max_seq_len} "
            f"tokens (to leave room for new ones), or re-export with a larger context "
            f"(fxport export --max-seq-len {need})."
        )
    if need > max_seq_len:
        raise ContextOverflowError(
            f"generate: prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} needs "
            f"{need} cache positions but the backend holds max_seq_len={max_seq_len}; shorten "
            f"the prompt, lower max_new_tokens to {max(max_seq_len - prompt_len + 1, 0)}, or "
            "export with a larger max_seq_len."
        )


class _Streamer:
    """Incremental detokenization: emits new text, holding back incomplete UTF-8 sequences and
    text that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], callback: Callable[[str], Any] | None):
        self.tokenizer, self.stop_strings, self.callback = tokenizer, list(stop_strings), callback
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.emitted = 0
        self.text = ""

    def update(self, ids: Sequence[int]) -> bool:
        """Decode ``ids``; True when a stop string appeared (text cut before it)."""
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop_strings if s and s in text]
        if hits:
            self.text = text[:min(hits)]
            self._emit(len(self.text))
            return True
        self.text = text
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete UTF-8 at the end
            end -= 1
        self._emit(max(self.emitted, end - self.hold))
        return False

    def flush(self) -> None:
        self._emit(len(self.text))

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            if self.callback is not None:
                self.callback(self.text[self.emitted:end])
            self.emitted = end


def _check_utf8(text: str) -> None:
    """ValueError for text that is not valid Unicode: command-line bytes that are not UTF-8
    arrive as lone surrogates (Python's ``surrogateescape``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"generate: the prompt is not valid UTF-8 (byte 0x{raw[0]:02x} at character {e.start}); "
            "pass UTF-8 text (check the terminal's encoding) or token ids (--prompt-ids)."
        ) from None


def _last_logits(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])[-1:]  # (1, V)


def generate(
    program: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampler: Sampler | Callable[[Tensor], Tensor] | None = None,
    max_prefill_chunk: int | None = None,
    stop: Sequence[str | int] | None = None,
    stream: Callable[[str], Any] | None = None,
    add_bos: bool | None = None,
    images: Sequence[Any] | None = None,
    audio: Any = None,
    max_soft_tokens: int | None = None,
    speculative: Any = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``.

    program: anything :func:`as_backend` accepts (eager model, export_methods dict, .pte path,
        Backend).
    tokenizer: a ``fxport.models.gemma4.tokenizer.Tokenizer`` (or anything with ``encode``,
        ``decode(ids, skip_special_tokens=)`` and ``eos_ids``); may be None when ``prompt`` is a
        list of ids (then no text, and only ``stop`` ids end generation).
    prompt: text (encoded with BOS per ``add_bos`` / the tokenizer's default) or token ids.
    sampler: a :class:`Sampler` or any ``(1, V) logits -> (1,) ids`` callable; default greedy.
    max_prefill_chunk: prompt chunk per prefill call (default and maximum: the backend's).
    stop: extra stop token ids (int) and stop strings (str); the tokenizer's eos ids always stop.
    stream: called with each new piece of text as soon as it is final.
    images: image paths or PIL images (a multimodal program only); each takes ``boi + image *
        n + eoi`` prompt tokens (see :mod:`fxport.runtime.multimodal` for where they go);
        ``max_soft_tokens`` caps n per image (default: the program's). audio: one clip or a list.
    speculative: a drafter (:class:`fxport.runtime.speculative.PromptLookup`): speculative
        decoding through the program's verify method, the same tokens as plain greedy decoding
        (the same distribution when sampling); ``result.speculative`` holds its statistics.
    """
    backend = as_backend(program)
    reset = getattr(backend, "reset", None)
    vocab_size = getattr(backend, "vocab_size", None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("generate: a text prompt needs a tokenizer; pass one or token ids.")
        _check_utf8(prompt)
        ids = list(tokenizer.encode(prompt, add_bos=add_bos))
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        fix = ("the tokenizer does not belong to this program"
               + (f" (it has {tok_vocab} ids)" if tok_vocab is not None else "")
               + ": use the tokenizer the program was exported with (--tokenizer FILE.gguf|DIR, "
               "or re-export to write MODEL.tokenizer/ beside the program).")
    else:
        ids = [int(i) for i in prompt]
        fix = None
    try:
        check_token_ids(ids, vocab_size, fix)
    except TokenIdError as e:
        raise TokenIdError(f"generate: {e}") from None
    if not ids:
        raise ValueError("generate: the prompt has no tokens; pass at least one (e.g. BOS).")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1.")
    chunk = backend.max_prefill_chunk if max_prefill_chunk is None else int(max_prefill_chunk)
    if not 1 <= chunk <= backend.max_prefill_chunk:
        raise ValueError(
            f"generate: max_prefill_chunk={chunk} must be in [1, {backend.max_prefill_chunk}] "
            "(the backend's largest prefill chunk)."
        )
    mm_prompt = None
    if images or audio is not None:
        from .multimodal import build_prompt

        bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else getattr(backend, "bos_id", None)

        def fits(total: int, added: int) -> None:  # before any encoder runs
            try:
                check_context(total, max_new_tokens, backend.max_seq_len)
            except ContextOverflowError as e:
                raise ContextOverflowError(
                    f"{e} The {len(images or [])} image(s) / audio take {added} of the {total} prompt tokens: "
                    "pass fewer images or a lower max_soft_tokens."
                ) from None

        mm_prompt = build_prompt(backend, ids, images or [], audio, max_soft_tokens, bos_id=bos, check_length=fits)
        ids = mm_prompt.ids
    check_context(len(ids), max_new_tokens, backend.max_seq_len)
    sampler = sampler if sampler is not None else Sampler()
    stop = list(stop or [])
    stop_ids = {int(s) for s in stop if not isinstance(s, str)}
    # The tokenizer's end ids and the program's (get_eos_ids: where ExecuTorch's runner stops too)
    eos_ids = set(getattr(tokenizer, "eos_ids", ()) or ()) | set(getattr(backend, "eos_ids", ()) or ())
    streamer = _Streamer(tokenizer, [s for s in stop if isinstance(s, str)], stream)
    result = GenerationResult(prompt_tokens=ids)
    if reset is not None:
        reset()

    prompt_t = torch.tensor([ids], dtype=torch.long)  # (1, n)
    t0 = time.perf_counter()
    bounds = (mm_prompt.chunks(chunk) if mm_prompt is not None
              else [(s, min(s + chunk, len(ids))) for s in range(0, len(ids), chunk)])
    for start, end in bounds:
        extra = mm_prompt.features(start, end) if mm_prompt is not None else {}
        logits = backend.prefill(prompt_t[:, start:end], torch.arange(start, end, dtype=torch.long), **extra)
        result.prefill_chunks += 1
    result.prefill_s = time.perf_counter() - t0

    # A backend with its own threadpool (PteBackend) keeps torch's sampling ops off other threads
    step_context = getattr(backend, "step_context", None)
    with step_context() if step_context is not None else contextlib.nullcontext():
        _decode_loop(backend, sampler, logits, len(ids), result, eos_ids=eos_ids, stop_ids=stop_ids,
                     streamer=streamer, max_new_tokens=max_new_tokens, speculative=speculative,
                     multimodal=mm_prompt is not None)
    if result.stop_reason != "stop_string":
        streamer.update(result.tokens)
        streamer.flush()
    result.text = streamer.text
    return result


def _decode_loop(backend: Backend, sampler: Callable[[Tensor], Tensor], logits: Tensor, pos: int,
                 result: GenerationResult, *, eos_ids: set[int], stop_ids: set[int], streamer: _Streamer,
                 max_new_tokens: int, speculative: Any, multimodal: bool) -> None:
    """Sample from the prompt's ``logits``, then decode from position ``pos`` until a stop
    condition; fills ``result`` (tokens, stop_reason, decode_steps, decode_s)."""
    decode_s = 0.0
    next_id = int(sampler(_last_logits(logits).float())[0])
    if speculative is not None:  # fxport.runtime.speculative: its loop replaces the one below
        from .speculative import speculative_loop

        if multimodal:
            raise ValueError("generate: speculative decoding runs text prompts only; drop images / audio")
        result.speculative = speculative_loop(backend, speculative, sampler, result.prompt_tokens, next_id, result,
                                              eos_ids=eos_ids, stop_ids=stop_ids, streamer=streamer,
                                              max_new_tokens=max_new_tokens)
        return
    while True:
        result.tokens.append(next_id)
        if next_id in eos_ids:
            result.stop_reason = "eos"
            break
        if next_id in stop_ids:
            result.stop_reason = "stop_token"
            break
        if streamer.update(result.tokens):
            result.stop_reason = "stop_string"
            break
        if len(result.tokens) >= max_new_tokens:
            result.stop_reason = "max_new_tokens"
            break
        t1 = time.perf_counter()
        logits = backend.decode(torch.tensor([[next_id]], dtype=torch.long),
                                torch.tensor([pos], dtype=torch.long))
        next_id = int(sampler(_last_logits(logits).float())[0])
        decode_s += time.perf_counter() - t1
        result.decode_steps += 1
        pos += 1
    result.decode_s = decode_s
