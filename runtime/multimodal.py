"""Multimodal prompts for :func:`fxport.runtime.generate.generate`: images (and audio) -> features
merged by the program's ``prefill``.

A multimodal backend adds to the text :class:`~fxport.runtime.generate.Backend` protocol:

    backend.multimodal               # dict: image_token_id, boi/eoi ids, patch_size,
                                     #   pooling_kernel_size, max_soft_tokens, bidirectional,
                                     #   and (audio) audio_token_id, boa/eoa ids, max_audio_frames
    backend.encode_image(pixel_values (P, 3p^2), position_ids (P, 2)) -> (P / k^2, hidden)
    backend.encode_audio(features (1, T, M), mask (1, T)) -> ((1, T', hidden), (1, T'))   # optional
    backend.prefill(tokens, input_pos, image_features=None, audio_features=None)

Backends: :class:`MultimodalEagerBackend` (an eager ``Gemma4ForConditionalGeneration``) and
:class:`MultimodalPteBackend` (a ``.pte`` with an ``image_encoder`` method, as
``fxport.builder.multimodal.export_multimodal_pte`` writes it).

Prompt layout (as the HF processor): each image becomes ``boi + image_token * n + eoi`` (n = its
soft tokens), each clip ``boa + audio_token * n + eoa``. Where the prompt ids already hold one
``image_token_id`` per image, each is expanded in place; otherwise all images go right after
BOS (or first), then the audio clips, then the prompt. Prefill chunks never split a run of
placeholders when the program attends bidirectionally inside images (a run longer than the
chunk is an error then); each chunk gets the feature rows of its own placeholders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .image import DEFAULT_MAX_SOFT_TOKENS, preprocess_image


class MultimodalError(ValueError):
    """A multimodal input the program cannot take; the message says what to change."""


def _image_config(cfg) -> dict[str, Any]:
    t = cfg.text
    out = dict(image_token_id=t.image_token_id, boi_token_id=cfg.boi_token_id, eoi_token_id=cfg.eoi_token_id,
               bidirectional=t.use_bidirectional_attention == "vision", hidden_size=t.hidden_size)
    if cfg.vision is not None:
        out.update(patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size)
    if cfg.audio is not None:
        out.update(audio_token_id=t.audio_token_id, boa_token_id=cfg.boa_token_id, eoa_token_id=cfg.eoa_token_id)
    return out


class MultimodalEagerBackend:
    """An eager :class:`~fxport.models.gemma4.multimodal.Gemma4ForConditionalGeneration`."""

    def __init__(self, model: torch.nn.Module, max_prefill_chunk: int | None = None,
                 max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS, max_audio_frames: int | None = None):
        self.model = model.eval()
        self.max_seq_len = int(model.max_seq_len)
        self.max_prefill_chunk = int(max_prefill_chunk or self.max_seq_len)
        self.multimodal = _image_config(model.config)
        self.multimodal["max_soft_tokens"] = max_soft_tokens
        self.multimodal["max_audio_frames"] = max_audio_frames
        self.has_images = model.config.vision is not None
        self.has_audio = model.config.audio is not None
        self.bos_id = model.config.text.bos_token_id

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor, position_ids: Tensor) -> Tensor:
        feats, _ = self.model.encode_images(pixel_values[None], position_ids[None])
        return feats[0]

    @torch.no_grad()
    def encode_audio(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_audio(features, mask)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, input_pos: Tensor, image_features: Tensor | None = None,
                audio_features: Tensor | None = None) -> Tensor:
        return self.model(tokens, input_pos, image_features, audio_features)

    @torch.no_grad()
    def decode(self, token: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(token, input_pos)

    def reset(self) -> None:
        self.model.reset_caches()


@functools.lru_cache(maxsize=None)
def _pte_class():
    """The .pte backend class, defined on first use (importing it imports executorch)."""
    from fxport.runtime.pte_backend import PteBackend

    class MultimodalPteBackend(PteBackend):
        """A ``.pte`` with ``image_encoder`` [/ ``audio_encoder``], ``prefill`` taking features, ``decode``."""

        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            names = set(self.program.method_names)
            get = self._constant
            self.has_images = "image_encoder" in names
            self.has_audio = "audio_encoder" in names
            self.multimodal = dict(
                image_token_id=get("get_image_token_id"), boi_token_id=get("get_boi_token_id"),
                eoi_token_id=get("get_eoi_token_id"), bidirectional=bool(get("get_use_bidirectional_vision")),
                hidden_size=get("get_hidden_size"), patch_size=get("get_patch_size"),
                pooling_kernel_size=get("get_pooling_kernel_size"), max_soft_tokens=get("get_max_soft_tokens"),
                audio_token_id=get("get_audio_token_id"), boa_token_id=get("get_boa_token_id"),
                eoa_token_id=get("get_eoa_token_id"), max_audio_frames=get("get_max_audio_frames"),
            )
            self._n_prefill_inputs = self.program.metadata("prefill").num_inputs()
            self._image = self.program.load_method("image_encoder") if self.has_images else None
            self._audio = self.program.load_method("audio_encoder") if self.has_audio else None

        def encode_image(self, pixel_values: Tensor, position_ids: Tensor) -> Tensor:
            return self._image.execute([pixel_values[None].float().contiguous(),
                                        position_ids[None].to(torch.long).contiguous()])[0]

        def encode_audio(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
            out = self._audio.execute([features.float().contiguous(), mask.to(torch.bool).contiguous()])
            return out[0], out[1]

        def prefill(self, tokens: Tensor, input_pos: Tensor, image_features: Tensor | None = None,
                    audio_features: Tensor | None = None) -> Tensor:
            if self._n_prefill_inputs == 2:
                return super().prefill(tokens, input_pos)
            L = tokens.shape[-1]
            if not 1 <= L <= self.max_prefill_chunk:
                raise ValueError(f"prefill chunk of {L} tokens; this .pte accepts 1..{self.max_prefill_chunk} per call")
            H = self.multimodal["hidden_size"]
            zero = torch.zeros(1, H)  # the program takes >= 1 feature row; a chunk without placeholders ignores it
            args = [tokens.to(torch.long).contiguous(), input_pos.to(torch.long).contiguous(),
                    (zero if image_features is None else image_features.float()).contiguous()]
            if self._n_prefill_inputs == 4:
                args.append((zero if audio_features is None else audio_features.float()).contiguous())
            return self._prefill.execute(args)[0]

    return MultimodalPteBackend


def open_pte(path, **kwargs) -> Any:
    """The backend for a ``.pte``: multimodal when it has an ``image_encoder`` or ``audio_encoder``."""
    return _pte_class()(path, **kwargs)  # a text-only program: has_images False, prefill takes 2 inputs


# ---------------------------------------------------------------------------------- prompt


@dataclass
class MultimodalPrompt:
    ids: list[int]
    image_rows: Tensor | None = None  # (sum of image soft tokens, H), in prompt order
    audio_rows: Tensor | None = None
    runs: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image run
    soft_tokens: list[int] = field(default_factory=list)
    mm: dict[str, Any] = field(default_factory=dict)  # the backend's ``multimodal`` description

    def features(self, start: int, end: int) -> dict[str, Tensor | None]:
        """Feature rows of the placeholders in ``ids[start:end]`` (None when there are none)."""
        out: dict[str, Tensor | None] = {}
        mm = self.mm
        for key, rows, pid in (("image_features", self.image_rows, mm.get("image_token_id")),
                               ("audio_features", self.audio_rows, mm.get("audio_token_id"))):
            if rows is None:
                continue
            before = sum(1 for t in self.ids[:start] if t == pid)
            inside = sum(1 for t in self.ids[start:end] if t == pid)
            out[key] = rows[before:before + inside] if inside else None
        return out

    def chunks(self, chunk: int) -> list[tuple[int, int]]:
        """Prefill chunk bounds: at most ``chunk`` tokens, never splitting an image run when the
        program attends bidirectionally inside images (a longer run is an error then)."""
        bounds, start, n = [], 0, len(self.ids)
        bidir = bool(self.mm.get("bidirectional"))
        while start < n:
            end = min(start + chunk, n)
            for s, e in self.runs:
                if s < end < e:  # the chunk would split this run
                    if bidir and e - s > chunk:
                        raise MultimodalError(
                            f"generate: an image of {e - s} soft tokens does not fit one prefill chunk of "
                            f"{chunk} tokens, and this program attends both ways inside images; pass a "
                            "larger chunk (export with a larger max_prefill_chunk) or lower max_soft_tokens."
                        )
                    if s > start:  # cut before the run; a run longer than a chunk is split (causal)
                        end = s
            bounds.append((start, end))
            start = end
        return bounds


def build_prompt(backend: Any, ids: Sequence[int], images: Sequence[Any] = (), audio: Any = None,
                 max_soft_tokens: int | None = None, bos_id: int | None = None,
                 check_length: Callable[[int, int], None] | None = None) -> MultimodalPrompt:
    """Encode the images (and audio) and lay out the prompt ids (see the module docstring).

    ``check_length(prompt_tokens, multimodal_tokens)`` runs after preprocessing and before any
    encoder call (so a prompt that cannot fit the context costs no encoder time)."""
    ids = [int(i) for i in ids]
    images = list(images or [])
    clips = [] if audio is None else (audio if isinstance(audio, list) else [audio])  # one clip or a list
    mm = getattr(backend, "multimodal", None)
    if images and not getattr(backend, "has_images", False):
        where = getattr(backend, "path", type(backend).__name__)
        raise MultimodalError(
            f"generate: {where} is a text-only program (no image_encoder method) but {len(images)} image(s) "
            "were given; export a multimodal model (fxport.builder.multimodal.export_multimodal_pte) or "
            "drop the images."
        )
    if clips and not getattr(backend, "has_audio", False):
        raise MultimodalError("generate: this program has no audio_encoder method; drop the audio or export "
                              "a model with an audio tower.")
    prompt = MultimodalPrompt(ids=ids, mm=dict(mm or {}))
    if not images and not clips:
        return prompt
    limit = mm.get("max_soft_tokens") or DEFAULT_MAX_SOFT_TOKENS
    soft = limit if max_soft_tokens is None else int(max_soft_tokens)
    if soft > limit:
        raise MultimodalError(
            f"generate: max_soft_tokens={soft} exceeds the {limit} soft tokens per image this program's "
            f"image_encoder was exported for; pass at most {limit}."
        )
    img_id, boi, eoi = mm["image_token_id"], mm["boi_token_id"], mm["eoi_token_id"]
    inputs = [preprocess_image(im, mm["patch_size"], mm["pooling_kernel_size"], soft) for im in images]
    clip_inputs = []
    if clips:
        from .audio import prepare_audio

        clip_inputs = [prepare_audio(c, max_frames=mm.get("max_audio_frames") or None) for c in clips]
    if check_length is not None:
        added = sum(i.num_soft_tokens + 2 for i in inputs) + sum(a.num_soft_tokens + 2 for a in clip_inputs)
        check_length(len(ids) + added, added)
    pieces, rows = [], []
    for inp in inputs:
        P = limit * mm["pooling_kernel_size"] ** 2  # the encoder's fixed patch count
        pv = torch.zeros(P, inp.pixel_values.shape[1])
        pos = torch.full((P, 2), -1, dtype=torch.long)
        pv[:inp.pixel_values.shape[0]], pos[:inp.position_ids.shape[0]] = inp.pixel_values, inp.position_ids
        feats = backend.encode_image(pv, pos)  # (limit, H): the first n rows are the image's
        rows.append(feats[:inp.num_soft_tokens])
        pieces.append([boi] + [img_id] * inp.num_soft_tokens + [eoi])
        prompt.soft_tokens.append(inp.num_soft_tokens)
    audio_pieces, audio_rows = [], []
    for a in clip_inputs:
        feats, valid = backend.encode_audio(a.input_features, a.input_features_mask)
        audio_rows.append(feats[0][valid[0].to(torch.bool)][: a.num_soft_tokens])
        audio_pieces.append([mm["boa_token_id"]] + [mm["audio_token_id"]] * a.num_soft_tokens + [mm["eoa_token_id"]])
    n_marks = sum(1 for t in ids if t == img_id)
    if images and n_marks == len(images):  # expand each image token in place
        out: list[int] = []
        it = iter(pieces)
        for t in ids:
            out += next(it) if t == img_id else [t]
    elif n_marks == 0:
        head = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
        out = ids[:head] + [t for p in pieces for t in p] + [t for p in audio_pieces for t in p] + ids[head:]
        audio_pieces = []
    else:
        raise MultimodalError(
            f"generate: the prompt holds {n_marks} image token(s) (id {img_id}) but {len(images)} image(s) "
            "were given; put one image token per image, or none (images then go first)."
        )
    if audio_pieces:  # images expanded in place: audio goes after BOS
        head = 1 if out and bos_id is not None and out[0] == bos_id else 0
        out = out[:head] + [t for p in audio_pieces for t in p] + out[head:]
    prompt.ids = out
    prompt.image_rows = torch.cat(rows) if rows else None
    prompt.audio_rows = torch.cat(audio_rows) if audio_rows else None
    i = 0
    while i < len(out):
        if out[i] == img_id:
            j = i
            while j < len(out) and out[j] == img_id:
                j += 1
            prompt.runs.append((i, j))
            i = j
        else:
            i += 1
    return prompt
