"""Multimodal prompts for :func:`fxport.runtime.generate.generate`: images and audio clips in a
prompt, on either multimodal program layout.

**ExecuTorch MultimodalRunner's layout** (``token_embedding`` / ``text_decoder`` /
``vision_encoder`` / ``audio_encoder``; ``fxport.builder.multimodal``'s docstring states it):
:class:`RunnerLayoutBackend` runs it the way the runner does. The prompt is prefilled segment by
segment, each one ``text_decoder`` call at the running position: text in chunks of at most
``get_max_seq_len`` tokens (``token_embedding`` first), each image's ``vision_encoder`` output
(boi, soft tokens, eoi) whole, each clip's ``audio_encoder`` output (boa, soft tokens, eoa)
whole; decoding is ``token_embedding`` of one token, then ``text_decoder``. Images are resized on
the host (:func:`fxport.runtime.image.resize_image`), clips turned into their real log-mel frames
(:func:`fxport.runtime.audio.prepare_audio`: a WAV path, a waveform or the extractor's output).

**fxport's merged layout** (``image_encoder`` [/ ``audio_encoder``], ``prefill`` taking the
feature rows of its chunk's placeholders, ``decode``): :class:`MultimodalPteBackend`, and
:class:`MultimodalEagerBackend` for an eager ``Gemma4ForConditionalGeneration``:

    backend.multimodal               # dict: image_token_id, boi/eoi ids, patch_size,
                                     #   pooling_kernel_size, max_soft_tokens, bidirectional,
                                     #   and (audio) audio_token_id, boa/eoa ids, max_audio_frames, n_mels
    backend.encode_image(pixel_values (P, 3p^2), position_ids (P, 2)) -> (P / k^2, hidden)
    backend.encode_audio(features (1, T, M), mask (1, T)) -> ((1, T', hidden), (1, T'))   # optional
    backend.prefill(tokens, input_pos, image_features=None, audio_features=None)

Prompt layout (as the HF processor): each image becomes ``boi + image_token * n + eoi`` (n = its
soft tokens), each clip ``boa + audio_token * n + eoa``. Where the prompt ids hold one
``image_token_id`` per image (one ``audio_token_id`` per clip), each is expanded in place (the
chat template's ``<|image|>`` / ``<|audio|>``, a user's ``<image>`` / ``<audio>`` marker);
otherwise the images go right after BOS, then the clips. In the merged layout, prefill chunks
never split a run of image placeholders when the program attends bidirectionally inside images.

Text prompts: :func:`prompt_ids` (``fxport run --prompt``: Gemma's chat format when asked or
when the tokenizer came with a chat template, markers), :func:`stock_segments` (the same prompt
as ExecuTorch ``MultimodalRunner`` segments), :func:`chat_text`; :func:`bench_multimodal` times a
program on real inputs (``fxport bench --image / --audio``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .backend import check_token_ids
from .image import DEFAULT_MAX_SOFT_TOKENS, preprocess_image
from .pte_backend import torch_ops_inline


class MultimodalError(ValueError):
    """A multimodal input the program cannot take; the message says what to change."""


def _image_config(cfg) -> dict[str, Any]:
    t = cfg.text
    out = dict(image_token_id=t.image_token_id, boi_token_id=cfg.boi_token_id, eoi_token_id=cfg.eoi_token_id,
               bidirectional=t.use_bidirectional_attention == "vision", hidden_size=t.hidden_size)
    if cfg.vision is not None:
        out.update(patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size)
    if cfg.audio is not None:
        out.update(audio_token_id=t.audio_token_id, boa_token_id=cfg.boa_token_id, eoa_token_id=cfg.eoa_token_id,
                   n_mels=cfg.audio.n_mels)
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
            if self.has_audio:  # input_features (1, T, n_mels): the log-mel width of a waveform's features
                self.multimodal["n_mels"] = int(self.program.metadata("audio_encoder").input_tensor_meta(0).sizes()[-1])

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


class RunnerLayoutBackend:
    """A ``.pte`` in ExecuTorch ``MultimodalRunner``'s layout (``token_embedding``, ``text_decoder``,
    ``vision_encoder`` [/ ``audio_encoder``]; fxport.models.gemma4.runner_methods' docstring),
    run the way that runner runs it: the prompt is prefilled segment by segment, each a
    ``text_decoder`` call at the running position (text through ``token_embedding`` in chunks of
    at most ``max_prefill_chunk``; an image's or a clip's encoder output, boi / boa and eoi / eoa
    included, whole); a decode step is ``token_embedding`` of one token then ``text_decoder``.

    ``segmented = True`` tells :func:`build_prompt` to lay the prompt out as such segments.
    Raises PteError (one line) for a file ExecuTorch cannot load.
    """

    segmented = True

    def __init__(self, path, *, data_path=None, num_threads: int | None = None, verbose: bool | None = None):
        from pathlib import Path

        from fxport import contract
        from fxport.fileio import weights_file
        from fxport.runtime.backend import PteError

        path = Path(path)
        if not path.is_file():
            raise PteError(f"no such .pte file: {path}")
        if data_path is None and weights_file(path).is_file():
            data_path = weights_file(path)
        from fxport.runtime.integrity import check_weights

        check_weights(path, data_path)
        from executorch.runtime import Runtime

        from fxport.runtime.native_log import capture_native_stderr, verbose_default

        with capture_native_stderr(verbose_default() if verbose is None else verbose) as native:
            if num_threads is not None:
                from fxport.runtime.pte_backend import set_num_threads

                set_num_threads(num_threads)
            try:
                contract.load_llm_kernels()  # embedding_byte, llama::custom_sdpa (fxport.passes.xnnpack.CustomSDPA)
                self.program = Runtime.get().load_program(path, data_path=data_path)
                names = set(self.program.method_names)
                missing = [m for m in (contract.TOKEN_EMBEDDING, contract.TEXT_DECODER) if m not in names]
                if not missing:
                    self._embed = self.program.load_method(contract.TOKEN_EMBEDDING)
                    self._decoder = self.program.load_method(contract.TEXT_DECODER)
                    self._vision = (self.program.load_method(contract.VISION_ENCODER)
                                    if contract.VISION_ENCODER in names else None)
                    self._audio = (self.program.load_method(contract.AUDIO_ENCODER)
                                   if contract.AUDIO_ENCODER in names else None)
                failure = None
            except Exception as exc:  # the runtime raises RuntimeError with a status code
                failure = exc
        if failure is not None:
            lines = [line for line in native.lines() if "cpuinfo" not in line]
            raise PteError(f"{path} is not a loadable ExecuTorch program ({' '.join(lines[-2:]) or failure})") from None
        if missing:
            raise PteError(f"{path} has no method(s) {missing} (methods: {sorted(names)}); it is not in "
                           "MultimodalRunner's layout: export it with fxport")
        self.path = path
        get = self._constant
        self.max_prefill_chunk = int(get(contract.MAX_SEQ_LEN))
        self.max_seq_len = int(get(contract.MAX_CONTEXT_LEN) or 0) or None
        self.vocab_size, self.bos_id = get(contract.VOCAB_SIZE), get(contract.BOS_ID)
        self.eos_ids = tuple(get(contract.EOS_IDS) or ())
        self.has_images, self.has_audio = self._vision is not None, self._audio is not None
        self.multimodal = dict(
            image_token_id=get(contract.IMAGE_TOKEN_ID), boi_token_id=get(contract.BOI_TOKEN_ID),
            eoi_token_id=get(contract.EOI_TOKEN_ID), bidirectional=bool(get(contract.BIDIRECTIONAL_VISION)),
            hidden_size=get(contract.HIDDEN_SIZE), embedding_dim=get(contract.EMBEDDING_DIM),
            patch_size=get(contract.PATCH_SIZE), pooling_kernel_size=get(contract.POOLING_KERNEL_SIZE),
            max_soft_tokens=get(contract.MAX_SOFT_TOKENS), max_image_cells=get(contract.MAX_IMAGE_CELLS),
            audio_token_id=get(contract.AUDIO_TOKEN_ID),
            boa_token_id=get(contract.BOA_TOKEN_ID), eoa_token_id=get(contract.EOA_TOKEN_ID),
            max_audio_frames=get(contract.MAX_AUDIO_FRAMES),
        )
        if self.has_audio:  # features (1, F, n_mels)
            meta = self.program.metadata(contract.AUDIO_ENCODER).input_tensor_meta(0)
            self.multimodal["n_mels"] = int(meta.sizes()[-1])

    def _constant(self, name: str) -> Any:
        from fxport.runtime.backend import constant_value

        return constant_value(self.program, name)

    @staticmethod
    def _execute(method: Any, args: list) -> Tensor:
        """``method``'s first output, torch's ops on this thread meanwhile (as PteBackend runs a
        method: :func:`fxport.runtime.pte_backend.torch_ops_inline`)."""
        with torch_ops_inline():
            return method.execute(args)[0]

    def step_context(self) -> Any:
        """What a generate loop holds around its decode steps and their sampling (as PteBackend)."""
        return torch_ops_inline()

    def embed(self, tokens: Tensor) -> Tensor:
        """``token_embedding``: tokens (1, T) -> (1, T, E)."""
        check_token_ids(tokens, self.vocab_size, f"{self.path} was exported for {self.vocab_size} ids.")
        return self._execute(self._embed, [tokens.to(torch.long).reshape(1, -1).contiguous()])

    def decode_embeddings(self, embeddings: Tensor, input_pos: Tensor) -> Tensor:
        """``text_decoder``: (1, T, E) at positions (T,) -> logits."""
        T = embeddings.shape[1]
        if not 1 <= T <= self.max_prefill_chunk:
            raise ValueError(f"text_decoder call of {T} rows; this .pte accepts 1..{self.max_prefill_chunk} per call")
        return self._execute(self._decoder, [embeddings.contiguous(), input_pos.to(torch.long).contiguous()])

    def prefill(self, tokens: Tensor, input_pos: Tensor, embeddings: Tensor | None = None) -> Tensor:
        """One segment: a text chunk (embedded here) or an encoder's rows (``embeddings``)."""
        return self.decode_embeddings(self.embed(tokens) if embeddings is None else embeddings, input_pos)

    def decode(self, token: Tensor, input_pos: Tensor) -> Tensor:
        return self.decode_embeddings(self.embed(token), input_pos.reshape(1))

    def encode_image(self, image: Tensor) -> Tensor:
        """``vision_encoder``: uint8 (3, H, W) resized -> (1, n + 2, E): boi, soft tokens, eoi."""
        return self._execute(self._vision, [image.to(torch.uint8).contiguous()])

    def encode_audio(self, features: Tensor) -> Tensor:
        """``audio_encoder``: the clip's real frames (1, F, n_mels) -> (1, n + 2, E): boa, soft tokens, eoa."""
        return self._execute(self._audio, [features.float().contiguous()])

    def reset(self) -> None:
        """Nothing to clear: every position a query sees is written first."""


def open_pte(path, **kwargs) -> Any:
    """The backend for a multimodal ``.pte``: :class:`RunnerLayoutBackend` for ExecuTorch
    ``MultimodalRunner``'s layout (a ``text_decoder`` method), else the merged-prefill layout
    (``image_encoder`` / ``audio_encoder``, ``prefill`` taking features)."""
    from fxport import contract
    from fxport.runtime.backend import program_methods

    names = program_methods(path, kwargs.get("data_path")) or set()  # None: the backend says why
    if contract.TEXT_DECODER in names:
        return RunnerLayoutBackend(path, **kwargs)
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
    # MultimodalRunner's layout: [start, end) of each image / clip (boi ... eoi) and its encoder
    # output (1, end - start, E), prefilled as one text_decoder call
    segments: list[tuple[int, int, Tensor]] = field(default_factory=list)

    def features(self, start: int, end: int) -> dict[str, Tensor | None]:
        """Feature rows of the placeholders in ``ids[start:end]`` (None when there are none); in
        the runner layout ``{"embeddings": rows}`` for a media segment, ``{}`` for text."""
        if self.segments:
            return next(({"embeddings": rows} for s, e, rows in self.segments if (s, e) == (start, end)), {})
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
        program attends bidirectionally inside images (a longer run is an error then). In the
        runner layout: each media segment whole, the text between in chunks of ``chunk``."""
        if self.segments:
            bounds, start = [], 0
            for s, e, _ in self.segments + [(len(self.ids), len(self.ids), None)]:
                bounds += [(a, min(a + chunk, s)) for a in range(start, s, chunk)]
                if e > s:
                    bounds.append((s, e))
                start = e
            return bounds
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
    if getattr(backend, "segmented", False):
        return _build_segments(backend, prompt, images, clips, soft, bos_id, check_length)
    img_id, boi, eoi = mm["image_token_id"], mm["boi_token_id"], mm["eoi_token_id"]
    for pid, given, kind in ((img_id, len(images), "image"), (mm.get("audio_token_id"), len(clips), "audio")):
        marks = sum(1 for t in ids if t == pid) if given else 0
        if marks and marks != given:  # before any preprocessing or encoder time
            raise MultimodalError(
                f"generate: the prompt holds {marks} {kind} token(s) (id {pid}) but {given} {kind} input(s) were "
                f"given; put one {kind} token per {kind}, or none ({kind}s then go after BOS)."
            )
    inputs = [preprocess_image(im, mm["patch_size"], mm["pooling_kernel_size"], soft) for im in images]
    clip_inputs = []
    if clips:
        from .audio import prepare_audio

        clip_inputs = [prepare_audio(c, n_mels=mm.get("n_mels"), max_frames=mm.get("max_audio_frames") or None)
                       for c in clips]
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
    out, _ = _place(ids, [(img_id, pieces, "image"), (mm.get("audio_token_id"), audio_pieces, "audio")], bos_id)
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


def _place(ids: list[int], kinds: list[tuple[int | None, list[list[int]], str]],
           bos_id: int | None) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Each kind's placeholder pieces into ``ids``: in place of its tokens when the prompt holds one
    per item (the chat template's ``<|image|>`` / ``<|audio|>``, or a user's marker), else right
    after BOS (images first, then audio clips). Returns the ids and ``(kind, item, start)`` of
    every piece, in prompt order."""
    seq: list[Any] = list(ids)  # ints, and (kind, item) where a piece goes
    head: list[Any] = []
    for pid, pieces, kind in kinds:
        if not pieces:
            continue
        marks = sum(1 for t in seq if t == pid)
        if marks == 0:
            head += [(kind, i) for i in range(len(pieces))]
            continue
        if marks != len(pieces):
            raise MultimodalError(
                f"generate: the prompt holds {marks} {kind} token(s) (id {pid}) but {len(pieces)} {kind} input(s) "
                f"were given; put one {kind} token per {kind}, or none ({kind}s then go after BOS)."
            )
        item = iter(range(len(pieces)))
        seq = [(kind, next(item)) if t == pid else t for t in seq]
    at = 1 if seq and bos_id is not None and seq[0] == bos_id else 0
    seq = seq[:at] + head + seq[at:]
    lookup = {kind: pieces for _, pieces, kind in kinds}
    out: list[int] = []
    where: list[tuple[str, int, int]] = []
    for x in seq:
        if isinstance(x, tuple):
            where.append((x[0], x[1], len(out)))
            out += lookup[x[0]][x[1]]
        else:
            out.append(x)
    return out, where


def _build_segments(backend: Any, prompt: MultimodalPrompt, images: list, clips: list, soft: int,
                    bos_id: int | None, check_length: Callable[[int, int], None] | None) -> MultimodalPrompt:
    """:func:`build_prompt` for MultimodalRunner's layout: each image resized on the host
    (:func:`fxport.runtime.image.resize_image`) and encoded whole by ``vision_encoder``, each clip's
    real log-mel frames by ``audio_encoder``; the ids hold ``boi + image * n + eoi`` (``boa + audio
    * n + eoa``) where the segment goes, and ``prompt.segments`` the encoder outputs."""
    from .image import resize_image

    mm = prompt.mm
    ids = prompt.ids
    for pid, given, kind in ((mm.get("image_token_id"), len(images), "image"),
                             (mm.get("audio_token_id"), len(clips), "audio")):
        marks = sum(1 for t in ids if t == pid) if given else 0
        if marks and marks != given:
            raise MultimodalError(
                f"generate: the prompt holds {marks} {kind} token(s) (id {pid}) but {given} {kind} input(s) were "
                f"given; put one {kind} token per {kind}, or none ({kind}s then go after BOS)."
            )
    resized = [resize_image(im, mm["patch_size"], mm["pooling_kernel_size"], soft) for im in images]
    side = mm["patch_size"] * mm["pooling_kernel_size"]
    for im, (img, _) in zip(images, resized):
        cells = (img.shape[1] // side, img.shape[2] // side)
        if min(cells) < 2 or (mm.get("max_image_cells") and max(cells) > mm["max_image_cells"]):
            where = f" {im}" if not hasattr(im, "size") else ""
            raise MultimodalError(
                f"generate: the image{where} resizes to {cells[0]} x {cells[1]} cells of {side} pixels; the program's "
                f"vision_encoder takes 2..{mm.get('max_image_cells') or soft} per side: crop it to a less extreme "
                "aspect ratio.")
    frames = [_clip_frames(c, mm) for c in clips]
    counts = [n for _, n in resized] + [_audio_rows(f.shape[1]) for f in frames]
    if check_length is not None:
        added = sum(n + 2 for n in counts)
        check_length(len(ids) + added, added)
    chunk = backend.max_prefill_chunk
    outputs = [backend.encode_image(img) for img, _ in resized] + [backend.encode_audio(f) for f in frames]
    for rows, n in zip(outputs, counts):
        if rows.shape[1] != n + 2 or rows.shape[1] > chunk:
            raise MultimodalError(
                f"generate: an encoder returned {rows.shape[1]} rows for {n} soft tokens (expected {n + 2}, at most "
                f"the program's {chunk} per text_decoder call); re-export the program with this fxport.")
    img_id, aud_id = mm.get("image_token_id"), mm.get("audio_token_id")
    pieces = [[mm["boi_token_id"]] + [img_id] * n + [mm["eoi_token_id"]] for _, n in resized]
    clip_pieces = [[mm["boa_token_id"]] + [aud_id] * _audio_rows(f.shape[1]) + [mm["eoa_token_id"]] for f in frames]
    out, where = _place(ids, [(img_id, pieces, "image"), (aud_id, clip_pieces, "audio")], bos_id)
    prompt.ids = out
    prompt.soft_tokens = [n for _, n in resized]
    for kind, i, start in where:
        rows = outputs[i if kind == "image" else len(pieces) + i]
        prompt.segments.append((start, start + rows.shape[1], rows))
        if kind == "image":
            prompt.runs.append((start + 1, start + rows.shape[1] - 1))
    return prompt


def _audio_rows(frames: int) -> int:
    """Soft tokens of a clip of ``frames`` real mel frames: the tower's two stride-2 subsamplings."""
    return -(-(-(-frames // 2)) // 2)


def _clip_frames(clip: Any, mm: dict[str, Any]) -> Tensor:
    """One clip's real log-mel frames (1, F, n_mels): what the runner layout's audio_encoder takes."""
    from .audio import AudioError, prepare_audio

    a = prepare_audio(clip, n_mels=mm.get("n_mels"))
    feats = a.input_features[a.input_features_mask]  # (F, M): the real frames, in order
    F, top = feats.shape[0], mm.get("max_audio_frames") or None
    if top is not None and F > top:
        raise AudioError(f"audio: the clip has {F} mel frames but the program's audio_encoder takes at most {top} "
                         f"({top / 100:.2f} s at a 10 ms hop); trim the clip or re-export with a larger "
                         "max_audio_frames.")
    if F < MIN_AUDIO_FRAMES:
        raise AudioError(f"audio: the clip has {F} mel frames, fewer than the {MIN_AUDIO_FRAMES} the audio_encoder "
                         f"takes ({MIN_AUDIO_FRAMES * 10} ms); pass a longer clip.")
    return feats[None]


MIN_AUDIO_FRAMES = 5  # the runner layout's audio_encoder frame dim is exported from 5


# ---------------------------------------------------------------------------------- text prompt


def chat_default(tokenizer: Any) -> bool:
    """``fxport run``'s default for ``--chat``: on for an instruction-tuned checkpoint (its
    tokenizer came with a chat template) whose vocabulary has Gemma's turn tokens."""
    from fxport.models.gemma4.tokenizer import chat_format_of

    return bool(getattr(tokenizer, "chat_template", None)) and chat_format_of(tokenizer) is not None


def prompt_ids(tokenizer: Any, backend: Any, prompt: str, images: int = 0, audio: int = 0,
               chat: bool | None = None, system: str | None = None) -> list[int] | str:
    """What ``fxport run`` hands :func:`fxport.runtime.generate.generate` for ``--prompt``.

    chat (None: :func:`chat_default`): Gemma's turn format (``fxport.models.gemma4.tokenizer.
    encode_chat``) around one user turn holding the images and clips where the prompt has
    ``<image>`` / ``<audio>`` markers, else before the text. Without chat, a prompt with markers
    becomes ids with the program's image / audio token there; a plain prompt stays text.
    """
    from fxport.models.gemma4 import tokenizer as tk

    mm = getattr(backend, "multimodal", None) or {}
    image_id, audio_id = mm.get("image_token_id"), mm.get("audio_token_id")
    if chat is None:
        chat = chat_default(tokenizer)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            tk.user_message(prompt, images=images, audio=audio)]
        return tk.encode_chat(tokenizer, messages, image_token_id=image_id, audio_token_id=audio_id)
    segments = tk.split_media_markers(prompt)
    if all(isinstance(s, str) for s in segments):
        return prompt
    for kind, given in (("image", images), ("audio", audio)):
        marks = sum(1 for s in segments if isinstance(s, dict) and s["type"] == kind)
        if marks and marks != given:
            raise MultimodalError(f"the prompt has {marks} <{kind}> marker(s) but {given} --{kind} file(s) were given; "
                                  f"put one <{kind}> per --{kind}, or none ({kind}s then go after BOS).")
    return tk.encode_segments(tokenizer, segments, image_id, audio_id, bos=tokenizer.add_bos)


def chat_text(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """A text-only chat prompt as text, without BOS (ExecuTorch's ``TextLLMRunner`` adds it with
    ``num_bos=1``): what ``fxport run --runner executorch --chat`` hands the runner."""
    from fxport.models.gemma4 import tokenizer as tk

    fmt = tk.chat_format_of(tokenizer)
    if fmt is None:
        raise ValueError("chat: the tokenizer has neither <|turn> (Gemma 4) nor <start_of_turn> (Gemma 3); "
                         "it is not a Gemma chat tokenizer: drop --chat.")
    messages = ([{"role": "system", "content": system}] if system else []) + [tk.user_message(prompt)]
    template = getattr(tokenizer, "chat_template", None) or ""
    # a <image> / <audio> marker is refused by user_message (no media given): every segment is text
    return "".join(tk.render_chat(messages, fmt, empty_thought="'<|channel>thought\\n<channel|>'" in template))


def stock_segments(tokenizer: Any, runner: Any, prompt: str, images: Sequence[Any] = (),
                   clips: Sequence[Any] = (), chat: bool | None = None, system: str | None = None) -> list:
    """The prompt as ExecuTorch ``MultimodalRunner`` segments for ``runner`` (a
    :class:`fxport.runtime.stock_multimodal_runner.StockMultimodalRunner`): fxport's token ids for
    the text (``Tokens``, BOS first), ``("image", image)`` and ``("audio", real log-mel frames)``
    in the order :func:`prompt_ids` lays them out (chat turns, markers, or media after BOS), so
    both runtimes see the same positions."""
    from fxport import contract
    from fxport.models.gemma4 import tokenizer as tk
    from fxport.runtime.stock_multimodal_runner import Tokens

    images, clips = list(images), list(clips)
    if chat is None:
        chat = chat_default(tokenizer)
    if chat:
        fmt = tk.chat_format_of(tokenizer)
        if fmt is None:
            raise ValueError("chat: the tokenizer has neither <|turn> (Gemma 4) nor <start_of_turn> (Gemma 3); "
                             "it is not a Gemma chat tokenizer: drop --chat.")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            tk.user_message(prompt, images=len(images), audio=len(clips))]
        template = getattr(tokenizer, "chat_template", None) or ""
        parts = tk.render_chat(messages, fmt, empty_thought="'<|channel>thought\\n<channel|>'" in template)
    else:  # markers in place; media without markers right after BOS (images, then clips), as _place
        parts = tk.split_media_markers(prompt)
        head: list[Any] = []
        for kind, given in (("image", len(images)), ("audio", len(clips))):
            marks = sum(1 for s in parts if isinstance(s, dict) and s["type"] == kind)
            if marks and marks != given:
                raise MultimodalError(f"the prompt has {marks} <{kind}> marker(s) but {given} --{kind} file(s) were "
                                      f"given; put one <{kind}> per --{kind}, or none ({kind}s then go after BOS).")
            head += [] if marks else [{"type": kind}] * given
        parts = head + parts
    mm = {"max_audio_frames": runner.constants.get(contract.MAX_AUDIO_FRAMES)}
    if clips and contract.AUDIO_ENCODER in runner.methods:  # features (1, F, n_mels): the method table says n_mels
        from executorch.runtime import Runtime

        meta = Runtime.get().load_program(runner.pte).metadata(contract.AUDIO_ENCODER).input_tensor_meta(0)
        mm["n_mels"] = int(meta.sizes()[-1])
    media = {"image": iter(images), "audio": iter(clips)}
    out: list = []
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and (chat or tokenizer.add_bos) else []
    for part in parts:
        if isinstance(part, str):
            ids = tokenizer.encode(part, add_bos=False)
            if ids or bos:
                out.append(Tokens(bos + ids))
                bos = []
        else:
            if bos:
                out.append(Tokens(bos))
                bos = []
            item = next(media[part["type"]])
            out.append(("image", item) if part["type"] == "image" else ("audio", _clip_frames(item, mm)))
    if bos:
        out.append(Tokens(bos))
    return out



def bench_multimodal(backend: Any, images: Sequence[Any] = (), clips: Sequence[Any] = (), prompt_len: int = 32,
                     new_tokens: int = 16, reps: int = 3) -> dict[str, float]:
    """Timings of a program in MultimodalRunner's layout on real inputs (``fxport bench --image /
    --audio``): medians over ``reps`` rounds after a warm-up of the encoders (ms per image / clip),
    the prefill of BOS + the media + ``prompt_len`` text tokens (tok/s over every position, the
    encoders not included) and ``new_tokens`` decode steps (tok/s)."""
    import statistics
    import time

    if not getattr(backend, "segmented", False):
        raise MultimodalError(f"{getattr(backend, 'path', 'this program')} is not in MultimodalRunner's layout "
                              "(no text_decoder method); bench --image / --audio times that layout: re-export it "
                              "with fxport export")
    mm = backend.multimodal
    reserved = {mm.get(k) for k in ("image_token_id", "audio_token_id", "boi_token_id", "eoi_token_id",
                                    "boa_token_id", "eoa_token_id")}
    top = int(backend.vocab_size or 1000)
    g = torch.Generator().manual_seed(0)
    allowed = torch.tensor([i for i in range(10, max(11, min(top, 30_000))) if i not in reserved])
    text = allowed[torch.randint(0, len(allowed), (prompt_len,), generator=g)].tolist()
    bos = backend.bos_id if backend.bos_id is not None else 2
    prompt = build_prompt(backend, [bos] + text, list(images), list(clips) or None, bos_id=bos)
    if prompt.ids and backend.max_seq_len is not None and len(prompt.ids) + new_tokens > backend.max_seq_len:
        raise MultimodalError(f"bench: {len(prompt.ids)} prompt positions + {new_tokens} new tokens exceed the "
                              f"program's {backend.max_seq_len}; lower --prompt-len / --new-tokens")
    from .image import resize_image

    resized = [resize_image(im, mm["patch_size"], mm["pooling_kernel_size"], mm["max_soft_tokens"])[0] for im in images]
    frames = [_clip_frames(c, mm) for c in clips]
    t_img, t_aud, t_pre, t_dec = [], [], [], []
    ids = torch.tensor([prompt.ids])
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        for im in resized:
            backend.encode_image(im)
        t1 = time.perf_counter()
        for f in frames:
            backend.encode_audio(f)
        t2 = time.perf_counter()
        backend.reset()
        for s, e in prompt.chunks(backend.max_prefill_chunk):
            logits = backend.prefill(ids[:, s:e], torch.arange(s, e), **prompt.features(s, e))
        t3 = time.perf_counter()
        pos, nxt = len(prompt.ids), int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        for _ in range(new_tokens):
            logits = backend.decode(torch.tensor([[nxt]]), torch.tensor([pos]))
            nxt, pos = int(logits.reshape(-1, logits.shape[-1])[-1].argmax()), pos + 1
        t4 = time.perf_counter()
        if rep:
            t_img.append((t1 - t0) / max(len(resized), 1))
            t_aud.append((t2 - t1) / max(len(frames), 1))
            t_pre.append(t3 - t2)
            t_dec.append(t4 - t3)
    med = statistics.median
    return dict(positions=len(prompt.ids), encode_image_ms=med(t_img) * 1e3 if resized else float("nan"),
                encode_audio_ms=med(t_aud) * 1e3 if frames else float("nan"),
                prefill_tok_s=len(prompt.ids) / med(t_pre), decode_tok_s=new_tokens / med(t_dec) if new_tokens else float("nan"))

