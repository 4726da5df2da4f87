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
CHAT_TEMPLATE_FILE = "chat_template.jinja"


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
        chat_template: the checkpoint's chat template (Jinja source) when it came with one: an
            instruction-tuned checkpoint; ``fxport run`` wraps prompts in the chat format then.
    """

    def __init__(self, backend: Backend, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None = None, add_bos: bool = True, chat_template: str | None = None):
        self.backend, self.bos_id, self.pad_id, self.add_bos = backend, bos_id, pad_id, add_bos
        self.chat_template = chat_template or None
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
        A tokenizer with a chat template also writes it beside, as ``chat_template.jinja`` (the
        file Hugging Face directories carry; :func:`tokenizer_from_hf_dir` reads it back).
        """
        if self.add_bos and self.bos_id is not None:
            bos = self.backend.id_to_token(self.bos_id)
            self.backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_id)])
        self.backend.save(str(path))
        if self.chat_template:
            Path(path).with_name(CHAT_TEMPLATE_FILE).write_text(self.chat_template)


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
                     pad_id=md.get("padding_token_id"), add_bos=bool(md.get("add_bos_token", True)),
                     chat_template=md.get("chat_template"))


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
    return Tokenizer(backend, bos, eos_ids, pad_id=pad, add_bos=bool(tcfg.get("add_bos_token", True)),
                     chat_template=_chat_template(path, tcfg))


def _chat_template(path: Path, tcfg: Mapping[str, Any]) -> str | None:
    """The directory's chat template: ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: the ``default`` one)."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text()
    t = tcfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


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


# ---- chat format -------------------------------------------------------------------------------
# Gemma's turn format, as the chat templates shipped with the checkpoints write it (transformers
# renders a checkpoint's ``chat_template.jinja`` in ``apply_chat_template``; transformers 5.23 ships
# no Gemma 4 template of its own, only its response parser, whose start anchor is
# ``"<|turn>model\n"`` and whose content closes at ``"<turn|>"``:
# transformers/cli/serving/utils.py, _RESPONSE_TEMPLATE_FALLBACKS["gemma4"]). The published Gemma 4
# template (llama.cpp keeps a copy: models/templates/gemma4.jinja) renders, for the parts fxport
# writes:
#
#     {{ bos_token }}
#     {%- if messages[0]['role'] in ['system', 'developer'] -%}
#         {{- '<|turn>system\n' -}} {{- messages[0]['content'] | trim -}} {{- '<turn|>\n' -}}
#     {%- for message in loop_messages -%}
#         {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
#         {{- '<|turn>' + role + '\n' }}
#         text: {{- item['text'] | trim -}}; image: {{- '\n\n<|image|>\n\n' -}}; audio: {{- '<|audio|>' -}}
#         {{- '<turn|>\n' -}}
#     {%- if add_generation_prompt -%} {{- '<|turn>model\n' -}}
#         (the 26B / 31B templates add '<|channel>thought\n<channel|>' unless enable_thinking)
#
# Gemma 3's template (transformers' tests/models/gemma3 processor fixture) writes
# ``<start_of_turn>user\n`` + (system text + "\n\n" on the first turn) + text ``<end_of_turn>\n``
# and ``<start_of_turn>model\n``. The processor then expands each ``<|image|>`` / ``<|audio|>`` into
# ``boi + image * n + eoi`` / ``boa + audio * n + eoa`` (fxport.runtime.multimodal does that).

CHAT_FORMATS = ("gemma4", "gemma3")
IMAGE, AUDIO = "image", "audio"  # content item types of a chat message
# Markers a user may write in a prompt where an image / audio clip goes.
MEDIA_MARKERS = {"<image>": IMAGE, "<|image|>": IMAGE, "<audio>": AUDIO, "<|audio|>": AUDIO}
_EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


def chat_format_of(tokenizer: Any) -> str | None:
    """``"gemma4"`` when the vocabulary has Gemma 4's ``<|turn>``, ``"gemma3"`` for
    ``<start_of_turn>``, else None (no turn format known)."""
    find = getattr(tokenizer, "token_to_id", None)
    if find is None:
        return None
    if find("<|turn>") is not None:
        return "gemma4"
    if find("<start_of_turn>") is not None:
        return "gemma3"
    return None


def split_media_markers(text: str) -> list[Any]:
    """``"a <image> b"`` -> ``["a ", {"type": "image"}, " b"]`` (see :data:`MEDIA_MARKERS`)."""
    import re

    pattern = "(" + "|".join(re.escape(m) for m in MEDIA_MARKERS) + ")"
    out: list[Any] = []
    for part in re.split(pattern, text):
        if part in MEDIA_MARKERS:
            out.append({"type": MEDIA_MARKERS[part]})
        elif part:
            out.append(part)
    return out


def user_message(prompt: str, images: int = 0, audio: int = 0) -> dict[str, Any]:
    """One user turn as a transformers chat message: the media go where ``prompt`` has markers
    (``<image>`` / ``<|image|>``, ``<audio>`` / ``<|audio|>``), else before the text (images,
    then audio), as the Gemma model cards place them. The marker counts must equal ``images``
    and ``audio`` (or be zero)."""
    parts = split_media_markers(prompt)
    marked = {k: sum(1 for p in parts if isinstance(p, dict) and p["type"] == k) for k in (IMAGE, AUDIO)}
    for kind, given in ((IMAGE, images), (AUDIO, audio)):
        if marked[kind] and marked[kind] != given:
            raise ValueError(
                f"chat: the prompt has {marked[kind]} <{kind}> marker(s) but {given} {kind} input(s) were given; "
                f"put one <{kind}> marker per {kind}, or none ({kind}s then go before the text)."
            )
    head = [{"type": IMAGE}] * (images if not marked[IMAGE] else 0) + [{"type": AUDIO}] * (audio if not marked[AUDIO] else 0)
    content = head + [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def render_chat(messages: Sequence[Mapping[str, Any]], fmt: str = "gemma4", add_generation_prompt: bool = True,
                empty_thought: bool = False) -> list[Any]:
    """The chat template's output as segments: text (str) and media items (``{"type": "image"}``
    / ``{"type": "audio"}`` where the template writes ``<|image|>`` / ``<|audio|>``). BOS is not
    included (:func:`encode_chat` adds the id). ``empty_thought``: the 26B / 31B templates'
    closed thought channel after the generation prompt."""
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"chat: unknown format {fmt!r}; choose one of {', '.join(CHAT_FORMATS)}.")
    messages = list(messages)
    out: list[Any] = []
    system = ""
    if messages and messages[0].get("role") in ("system", "developer"):
        content = messages[0]["content"]
        messages = messages[1:]
        if fmt == "gemma4":  # trimmed, like every content
            out.append("<|turn>system\n" + _content_text(content, strip=True) + "<turn|>\n")
        else:  # Gemma 3 prefixes the first user turn with the system text as written
            system = _content_text(content, strip=False) + "\n\n"
    turn, end = ("<|turn>", "<turn|>\n") if fmt == "gemma4" else ("<start_of_turn>", "<end_of_turn>\n")
    for i, message in enumerate(messages):
        role = "model" if message["role"] == "assistant" else message["role"]
        if fmt == "gemma3" and (role == "user") != (i % 2 == 0):
            raise ValueError("chat: Gemma 3 conversations alternate user / assistant turns, starting with user.")
        out.append(turn + role + "\n" + (system if i == 0 else ""))
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        for item in items:
            kind = item.get("type")
            if kind == "text":
                out.append(item["text"].strip())
            elif kind in (IMAGE, AUDIO):
                if fmt == "gemma3":
                    raise ValueError(f"chat: fxport's Gemma 3 chat format is text only; drop the {kind}.")
                out += ["\n\n", {"type": IMAGE}, "\n\n"] if kind == IMAGE else [{"type": AUDIO}]
        out.append(end)
    if add_generation_prompt:
        out.append(turn + "model\n" + (_EMPTY_THOUGHT if empty_thought and fmt == "gemma4" else ""))
    merged: list[Any] = []  # adjacent text joined (tokenized as one string, as the template's output is)
    for seg in out:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        elif seg != "":
            merged.append(seg)
    return merged


def _content_text(content: Any, strip: bool) -> str:
    if not isinstance(content, str):  # Gemma 3's template reads the first text item; Gemma 4's the string
        content = next((i["text"] for i in content if i.get("type") == "text"), "")
    return content.strip() if strip else content


def encode_segments(tokenizer: Any, segments: Sequence[Any], image_token_id: int | None = None,
                    audio_token_id: int | None = None, bos: bool = True) -> list[int]:
    """Token ids of text segments and media items (each one ``image_token_id`` /
    ``audio_token_id``, which :func:`fxport.runtime.multimodal.build_prompt` expands), BOS first
    when ``bos``. Text is encoded without BOS; special tokens in it (``<|turn>``) are matched whole."""
    ids: list[int] = [] if not bos or tokenizer.bos_id is None else [tokenizer.bos_id]
    for seg in segments:
        if isinstance(seg, str):
            ids += tokenizer.encode(seg, add_bos=False)
            continue
        pid = image_token_id if seg["type"] == IMAGE else audio_token_id
        if pid is None:
            raise ValueError(f"chat: the prompt has a <{seg['type']}> but the program has no {seg['type']} token id "
                             f"(no {seg['type']} encoder); drop the marker or use a multimodal program.")
        ids.append(int(pid))
    return ids


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], image_token_id: int | None = None,
                audio_token_id: int | None = None, fmt: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``'s ids for a
    Gemma tokenizer (see the comment above :data:`CHAT_FORMATS`); ``fmt`` defaults to the
    vocabulary's (:func:`chat_format_of`). The empty thought channel is added when the
    tokenizer's own template (``tokenizer.chat_template``) writes it."""
    fmt = fmt or chat_format_of(tokenizer)
    if fmt is None:
        raise ValueError("chat: the tokenizer has neither <|turn> (Gemma 4) nor <start_of_turn> (Gemma 3); "
                         "it is not a Gemma chat tokenizer: drop --chat.")
    template = getattr(tokenizer, "chat_template", None) or ""
    empty_thought = "'<|channel>thought\\n<channel|>'" in template
    segments = render_chat(messages, fmt, add_generation_prompt, empty_thought=empty_thought)
    return encode_segments(tokenizer, segments, image_token_id, audio_token_id)
