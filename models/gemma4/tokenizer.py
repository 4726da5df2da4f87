"""Gemma tokenizer from GGUF metadata or a Hugging Face directory.

A GGUF file has no ``tokenizer.json``: it stores the SentencePiece vocabulary as
``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` (llama.cpp's "llama" tokenizer model)
and no merges. :func:`gemma_backend_from_gguf` rebuilds the equivalent ``tokenizers`` BPE:

* vocabulary = the tokens in file order; tokens made only of spaces are stored as real spaces
  and are respelled with U+2581 ("▁"), the character the normalizer maps spaces to;
* merges = every split ``left + right`` of a token whose two halves are tokens, ranked by the
  merged token's position in the file (Gemma's SentencePiece scores do not follow merge order,
  the file order does), longer left halves first among splits of the same token;
* normalizer ``" " -> "▁"`` (no prefix space: ``add_space_prefix`` is false for Gemma), byte
  fallback for characters outside the vocabulary (``<0x..>`` tokens), decoder ``"▁" -> " "``,
  byte fallback, fuse;
* control tokens (type 3: ``<bos>``, ``<start_of_turn>``, ``<unusedN>`` ...) are special added
  tokens and user-defined tokens (type 4: ``"\\n"``, ``"\\n\\n"``, ``[multimodal]`` ...) plain added
  tokens, matched whole before BPE as llama.cpp does.

This is what transformers' GGUF tokenizer support builds too (the tests compare ids on a set of
strings), without needing transformers at runtime.

:class:`Tokenizer` wraps a backend with BOS handling and end-of-generation ids;
:func:`load_tokenizer` accepts a ``.gguf`` path, GGUF tokenizer metadata (as returned by
``load_gguf``) or a Hugging Face directory with ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, decoders, normalizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

__all__ = ["Tokenizer", "gemma_backend_from_gguf", "load_tokenizer", "TokenizerError"]

SPIECE_SPACE = "\u2581"
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class TokenizerError(ValueError):
    """A tokenizer source is missing or unsupported; the message says what to pass instead."""


class Tokenizer:
    """Text <-> token ids for the runtime.

    Attributes:
        backend: the ``tokenizers.Tokenizer`` doing the work.
        bos_id: id prepended by :meth:`encode` when ``add_bos`` (None if the model has none).
        eos_ids: ids that end generation (``<eos>``, and ``<end_of_turn>`` when the vocabulary
            has it, as llama.cpp treats it as end-of-generation for Gemma).
        pad_id: padding id.
        add_bos: default for :meth:`encode`.
    """

    def __init__(self, backend: Backend, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None = None, add_bos: bool = True):
        self.backend, self.bos_id, self.pad_id, self.add_bos = backend, bos_id, pad_id, add_bos
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``, with BOS first when ``add_bos`` (default: ``self.add_bos``).

        A text that starts with the BOS token itself (``"<bos>..."``, as chat templates and
        ExecuTorch's apps write prompts) gets no second one.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if not add or self.bos_id is None or (ids and ids[0] == self.bos_id):
            return ids
        return [self.bos_id] + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; incomplete UTF-8 byte sequences at the end decode to U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (what ExecuTorch's runner and :func:`tokenizer_from_hf_dir` read).

        When ``add_bos``, its post-processor prepends BOS: ExecuTorch's C++ ``HFTokenizer`` runs the
        post-processor when the runner is asked for BOS (``GenerationConfig(num_bos=1)``), and
        then gives the ids :meth:`encode` gives. :meth:`encode` itself never runs it.
        """
        if self.add_bos and self.bos_id is not None:
            bos = self.backend.id_to_token(self.bos_id)
            self.backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_id)])
        self.backend.save(str(path))


# ---- GGUF --------------------------------------------------------------------------------------
def _merges(tokens: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    ranked = []
    for index, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, -cut, -len(right), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gemma_backend_from_gguf(md: Mapping[str, Any]) -> Backend:
    """A ``tokenizers`` BPE equivalent to a Gemma GGUF vocabulary (see the module docstring).

    ``md``: GGUF tokenizer metadata with the ``tokenizer.ggml.`` prefix stripped (``tokens``,
    ``token_type``, ``unknown_token_id``, ...), as ``load_gguf`` returns it.
    """
    model = md.get("model")
    if model != "llama":
        raise TokenizerError(
            f"GGUF tokenizer model {model!r} is not supported; fxport builds the SentencePiece "
            "('llama') vocabularies Gemma 2/3 files use. Load the tokenizer from a Hugging Face "
            "directory instead."
        )
    tokens = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in md["tokens"]]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    types = list(md.get("token_type") or [1] * len(tokens))
    unk = tokens[int(md.get("unknown_token_id", 3))]
    backend = Backend(BPE(vocab=vocab, merges=_merges(tokens, vocab), unk_token=unk,
                          fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types) if ty == _CONTROL
    ])
    backend.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types) if ty == _USER_DEFINED
    ])
    return backend


def tokenizer_from_gguf_metadata(md: Mapping[str, Any]) -> Tokenizer:
    """:class:`Tokenizer` from GGUF tokenizer metadata (prefix ``tokenizer.ggml.`` stripped)."""
    backend = gemma_backend_from_gguf(md)
    eos = [int(md.get("eos_token_id", 1))]
    for key in ("eot_token_id", "eom_token_id"):
        if key in md:
            eos.append(int(md[key]))
    end_of_turn = backend.token_to_id("<end_of_turn>")
    if end_of_turn is not None:
        eos.append(end_of_turn)
    bos = md.get("bos_token_id")
    return Tokenizer(backend, None if bos is None else int(bos), eos,
                     pad_id=md.get("padding_token_id"), add_bos=bool(md.get("add_bos_token", True)))


# ---- Hugging Face directory ------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def tokenizer_from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """:class:`Tokenizer` from a directory with ``tokenizer.json``; BOS / EOS ids from
    ``generation_config.json``, ``config.json`` and ``tokenizer_config.json`` (first found)."""
    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise TokenizerError(
            f"no tokenizer.json in {path}; pass a Hugging Face directory with tokenizer.json, a "
            ".gguf file or GGUF tokenizer metadata."
        )
    backend = Backend.from_file(str(tj))
    gen, cfg, tcfg = (_read_json(path / n) for n in
                      ("generation_config.json", "config.json", "tokenizer_config.json"))
    cfg = cfg.get("text_config", cfg) | {k: v for k, v in cfg.items() if k.endswith("token_id")}

    def token_id(key: str) -> Any:
        for source in (gen, cfg):
            if source.get(f"{key}_token_id") is not None:
                return source[f"{key}_token_id"]
        tok = tcfg.get(f"{key}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return backend.token_to_id(tok) if tok else None

    bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if not eos_ids:
        raise TokenizerError(f"{path}: no eos token id in generation_config.json, config.json or "
                             "tokenizer_config.json; add eos_token_id to config.json.")
    return Tokenizer(backend, bos, eos_ids, pad_id=pad, add_bos=bool(tcfg.get("add_bos_token", True)))


def load_tokenizer(source: Any) -> Tokenizer:
    """A :class:`Tokenizer` from a ``.gguf`` path, GGUF tokenizer metadata (a mapping with
    ``tokens``), a Hugging Face directory, or a :class:`Tokenizer` (returned as is)."""
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, Mapping):
        if "tokens" not in source:
            raise TokenizerError("GGUF tokenizer metadata has no 'tokens'; pass what load_gguf "
                                 "returns as its third element.")
        return tokenizer_from_gguf_metadata(source)
    path = Path(source)
    from .load import is_gguf_file

    if path.suffix == ".gguf" or is_gguf_file(path):  # GGUF by its magic bytes (Ollama blobs have no suffix)
        from .load import gguf_tokenizer_metadata, read_gguf

        return tokenizer_from_gguf_metadata(gguf_tokenizer_metadata(read_gguf(path).metadata))
    if path.is_dir():
        return tokenizer_from_hf_dir(path)
    raise TokenizerError(
        f"cannot load a tokenizer from {source!r}: pass a .gguf file, GGUF tokenizer metadata or "
        "a Hugging Face directory with tokenizer.json."
    )
