"""Gemma 4 multimodal as ExecuTorch's ``MultimodalRunner`` calls it: four methods, one embedding layout.

ExecuTorch 1.5.1's runner (``extension/llm/runner/multimodal_prefiller.cpp``,
``multimodal_decoder_runner.h``) prefills a prompt segment by segment: a text segment through
``token_embedding``, an image through ``vision_encoder``, an audio clip through ``audio_encoder``;
each segment's output ``(1, n, E)`` goes whole into one ``text_decoder(embeddings, cache_position)``
call at the running position (``cache_position = start .. start + n - 1``; ``n = output.size(1)``,
no chunking), and decoding is ``token_embedding((1, 1))`` then ``text_decoder(e, [pos])``. It
passes the embedding tensor on without looking inside, so the columns carry what Gemma 4 needs
beyond an embedding:

    E = H + NL * P + 1 columns:  [ embedding (H) | per-layer identity (NL * P) | vision flag (1) ]

* embedding: what the decoder stack takes (token embedding times sqrt(H), or the encoder's soft
  token after ``embed_vision`` / ``embed_audio``);
* per-layer identity (E2B / E4B; NL * P = 0 otherwise): PLE's token-identity lookup
  ``embed_tokens_per_layer(id)`` (times sqrt(P)), layer-major; soft tokens carry the pad id's, as
  transformers replaces placeholders by the pad id before the lookup. ``text_decoder`` adds the
  context projection of the embedding column itself, so the per-layer inputs equal transformers';
* vision flag: 1.0 on an image's soft tokens, 0.0 elsewhere (text, boi / eoi, audio). With
  ``use_bidirectional_attention == "vision"`` the sliding layers of ``text_decoder`` let each run
  of flagged positions of one call see itself both ways (an image is always one call).

The encoders return ``boi, soft tokens, eoi`` (``boa, ..., eoa``): one image input takes the
positions transformers' processor gives ``<image>``, so ``[text, image, text]`` is the prompt
``text + boi + image_token * n + eoi + text``.

Methods (B = 1; float tensors in the model's dtype, float32 by default; s = patch * pooling):
    token_embedding(tokens int64 (1, T)) -> (1, T, E)                              T in [1, C]
    text_decoder(embeddings (1, T, E), cache_position int64 (T,)) -> logits float32 (1, T, V)
                                                                   (LastTokenLogits: (1, 1, V))
    vision_encoder(image uint8 (3, H, W)) -> (1, h * w + 2, E)    h = H // s, w = W // s in
        [2, max_image_cells], h * w <= max_soft_tokens: boi, the h * w soft tokens (row-major
        cells), eoi. Pixels past the last whole cell are dropped (a resized image has none); the
        caller resizes. The tower runs at max_soft_tokens * k^2 patches, padded as transformers pads.
    audio_encoder(features (1, F, n_mels)) -> (1, ceil(ceil(F / 2) / 2) + 2, E)   F in [5, max]
        boa, soft tokens, eoa; the clip's real log-mel frames only (the extractor's output
        where its mask is true).
C = ``max_prefill_chunk`` (the runner's ``get_max_seq_len``) bounds every segment: split longer
text into several segments; C >= max soft tokens + 2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.export import Dim, ExportedProgram

from fxport import contract  # the method and constant names, spelled once

from .audio import audio_output_length
from .model import _cast, _f32


# Pooled cells per image side the vision_encoder accepts by default: with transformers' resize to
# 280 soft tokens, images up to about 3.5 : 1 (31 x 8 cells) fit. ExecuTorch plans the memory
# of every tensor outside XNNPACK at its upper bound (h_max * w_max cells; the uint8 image alone is
# 3 * (48 * 33)^2 bytes at 32), so the bound is a memory cost, not only a limit.
DEFAULT_MAX_IMAGE_CELLS = 32

# A clip shorter than this (2 soft tokens; 50 ms at 10 ms per frame) is refused: one soft token
# would be a size-1 dimension, which torch.export traces as a different graph.
MIN_AUDIO_FRAMES = 5


def embedding_columns(config) -> tuple[int, int]:
    """(H, NL * P) of a multimodal config: the embedding and per-layer-identity widths; E = H + NL * P + 1."""
    t = config.text
    return t.hidden_size, t.num_hidden_layers * (t.hidden_size_per_layer_input or 0)


class _Columns(nn.Module):
    """Shared by the four methods: lays out [embedding | per-layer identity | flag]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.H, self.PL = embedding_columns(model.config)

    def lm(self):
        return self.model.model.language_model

    def token_rows(self, ids: Tensor) -> Tensor:
        # ids (1, T) -> (1, T, E) with flag 0: embedding and identity of these ids
        lm = self.lm()
        emb = lm.embed_tokens(ids)
        parts = [emb]
        if self.PL:
            parts.append(_cast(lm.per_layer_identity(ids), emb.dtype))
        parts.append(emb.new_zeros(*ids.shape, 1))
        return torch.cat(parts, dim=-1)

    def soft_rows(self, feats: Tensor, flag: float) -> Tensor:
        # feats (1, n, H) soft tokens -> (1, n, E): the pad id's identity, flag
        lm = self.lm()
        parts = [feats]
        if self.PL:
            pad = torch.full(feats.shape[:2], self.model.config.text.pad_token_id, dtype=torch.long, device=feats.device)
            parts.append(_cast(lm.per_layer_identity(pad), feats.dtype))
        parts.append(torch.full((*feats.shape[:2], 1), flag, dtype=feats.dtype, device=feats.device))
        return torch.cat(parts, dim=-1)


class TokenEmbedding(_Columns):
    """``token_embedding(tokens (1, T)) -> (1, T, E)`` (flag 0). A placeholder id (image, video,
    audio: e.g. one the model generated) is looked up as the pad id, as transformers does."""

    def forward(self, tokens: Tensor) -> Tensor:
        hit = None
        for pid in self.model.config.placeholder_ids():
            hit = tokens == pid if hit is None else hit | (tokens == pid)
        ids = tokens if hit is None else tokens.masked_fill(hit, self.model.config.text.pad_token_id)
        return self.token_rows(ids)


class TextDecoder(_Columns):
    """``text_decoder(embeddings (1, T, E), cache_position (T,)) -> logits (1, T, V)`` float32."""

    def forward(self, embeddings: Tensor, cache_position: Tensor) -> Tensor:
        cfg = self.model.config.text
        embeds = embeddings[..., : self.H]
        ident = embeddings[..., self.H: self.H + self.PL] if self.PL else None
        vision = embeddings[..., -1] > 0.5  # (1, T)
        bidir = vision if cfg.use_bidirectional_attention == "vision" else None
        h = self.lm().forward_embeds(embeds, None, cache_position, bidir, ple_identity=ident)
        logits = self.model.lm_head(h)
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return _f32(logits)


class VisionEncoder(_Columns):
    """``vision_encoder(image uint8 (3, H, W)) -> (1, 2 + H W / (p k)^2, E)``: boi, soft tokens, eoi.

    In the graph, as transformers' image processor after its resize: ``/ 255`` (rescale; Gemma 4
    does not normalize), patches row-major each flattened (row, column, channel), (column, row)
    position ids; then the vision tower, ``embed_vision``. Pixels past the last whole p * k cell
    are dropped (the resize :func:`fxport.runtime.image.target_size` gives whole cells).

    The tower runs at a fixed ``max_soft_tokens * k^2`` patches, the image's first and padding
    after them (position (-1, -1), masked: transformers' processor pads the same way), so only the
    pixel tensors before it depend on H and W: ExecuTorch plans every tensor outside XNNPACK at
    its upper bound, and a tower sized by the largest H x W would plan gigabytes. An image of
    more than ``max_soft_tokens`` cells keeps its first ``max_soft_tokens * k^2`` patches
    (row-major) and that many soft tokens: resize it first (fxport's wrapper refuses it)."""

    def __init__(self, model: nn.Module, max_soft_tokens: int):
        super().__init__(model)
        c = model.config
        self.p, self.k = c.vision.patch_size, c.vision.pooling_kernel_size
        self.max_patches = int(max_soft_tokens) * self.k * self.k
        with torch.no_grad():
            ids = torch.tensor([[c.boi_token_id, c.eoi_token_id]], device=_device(model))
            rows = self.token_rows(ids)  # (1, 2, E)
        self.register_buffer("boi_eoi", rows.detach().clone(), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        p, s = self.p, self.p * self.k
        # whole cells only: pixels past the last whole cell are dropped (a resized image has none;
        # ExecuTorch checks only a size's upper bound, so the graph itself must define the rest)
        Hh, Ww = image.shape[1] // s * s, image.shape[2] // s * s
        rows, cols = Hh // p, Ww // p
        dtype = self.boi_eoi.dtype
        # index_select, not a slice: a slice that keeps every row traces as a no-op, which would
        # tie the graph to sizes that are (or are not) whole cells
        x = image.index_select(1, torch.arange(Hh, device=image.device))
        x = x.index_select(2, torch.arange(Ww, device=image.device))
        x = x.to(torch.float32) / 255.0  # (3, H, W) in [0, 1]
        patches = x.reshape(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(1, rows * cols, 3 * p * p)
        r = torch.arange(rows, device=image.device)[:, None].expand(rows, cols)
        c = torch.arange(cols, device=image.device)[None, :].expand(rows, cols)
        pos = torch.stack([c, r], dim=-1).reshape(1, rows * cols, 2)  # (column, row)
        # to the fixed patch count: gather (indices clamped into the image), then mark padding
        P, M = rows * cols, self.max_patches
        slot = torch.arange(M, device=image.device)
        take = slot.clamp(max=P - 1)  # (M,)
        real = (slot < P)[None, :, None]  # (1, M, 1)
        pv = torch.where(real, patches.index_select(1, take), 0.0)  # (1, M, 3 p^2)
        pos = torch.where(real, pos.index_select(1, take), -1)  # (1, M, 2); (-1, -1) on padding
        feats, _ = self.model.encode_images(_cast(pv, dtype), pos)  # (1, M / k^2, H): the valid rows first
        n = (rows // self.k) * (cols // self.k)  # the image's soft tokens
        body = self.soft_rows(_cast(feats[:, :n], dtype), 1.0)
        return torch.cat([self.boi_eoi[:, :1], body, self.boi_eoi[:, 1:]], dim=1)


class AudioEncoder(_Columns):
    """``audio_encoder(features (1, F, n_mels)) -> (1, 2 + F', E)``: boa, soft tokens, eoa (flag 0);
    every frame is real (F' = ceil(ceil(F / 2) / 2), transformers' count for an unpadded clip)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        c = model.config
        with torch.no_grad():
            ids = torch.tensor([[c.boa_token_id, c.eoa_token_id]], device=_device(model))
            rows = self.token_rows(ids)
        self.register_buffer("boa_eoa", rows.detach().clone(), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        # Zero frames (mask False) up to a whole number of the tower's attention blocks, as the
        # feature extractor pads a batch: every shape is then a multiple of one symbol, and the
        # real rows are the first ceil(ceil(F / 2) / 2) (what they are with any padding).
        frames = features.shape[1]
        unit = 4 * self.model.config.audio.attention_chunk_size  # two stride-2 subsamplings, then blocks
        padded = ((frames + unit - 1) // unit + 1) * unit  # one spare block: never a single block (size-1 dims trace apart)
        x = torch.nn.functional.pad(features, (0, 0, 0, padded - frames))
        mask = (torch.arange(padded, device=features.device) < frames)[None]  # (1, padded)
        feats, _ = self.model.encode_audio(_cast(x, self.boa_eoa.dtype), mask)  # (1, padded / 4, H)
        body = self.soft_rows(_cast(feats[:, : (frames + 3) // 4], self.boa_eoa.dtype), 0.0)
        return torch.cat([self.boa_eoa[:, :1], body, self.boa_eoa[:, 1:]], dim=1)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def export_runner_methods(model: nn.Module, max_prefill_chunk: int, *, max_soft_tokens: int = 280,
                          max_image_cells: int | None = None, max_audio_frames: int | None = None,
                          strict: bool = False) -> dict[str, ExportedProgram]:
    """The four methods of the module docstring in functional ATen IR (``vision_encoder`` when the
    model has a vision tower, ``audio_encoder`` with an audio tower).

    max_prefill_chunk: C, the most rows one ``text_decoder`` call takes: at least
        ``max_soft_tokens + 2`` (an image) and a clip's rows + 2.
    max_soft_tokens: the image budget the caller resizes to (:func:`fxport.runtime.image.target_size`).
    max_image_cells: the most pooled cells per image side (h, w <= it); default
        ``min(max_soft_tokens, DEFAULT_MAX_IMAGE_CELLS)`` (see there).
    max_audio_frames: the most mel frames per clip (required with an audio tower).
    """
    cfg = model.config
    C = int(max_prefill_chunk)
    S = int(model.max_seq_len)
    if not 2 <= C <= S:
        raise ValueError(f"export_runner_methods: max_prefill_chunk={C} must be in [2, max_seq_len={S}]; "
                         "pass a larger max_prefill_chunk or build the model with a larger max_seq_len")
    if model.max_batch_size != 1:
        raise ValueError(f"export_runner_methods: max_batch_size={model.max_batch_size}; ExecuTorch's runner "
                         "runs batch 1: build the model with max_batch_size=1")
    dev = _device(model)
    dtype = next(model.parameters()).dtype
    H, PL = embedding_columns(cfg)
    E = H + PL + 1
    out: dict[str, ExportedProgram] = {}

    def run(module, args, shapes=None, deferred: bool = False) -> ExportedProgram:
        ep = torch.export.export(module.eval(), args, dynamic_shapes=shapes, strict=strict,
                                 prefer_deferred_runtime_asserts_over_guards=deferred)
        return ep.run_decompositions({})

    T = Dim("T", min=1, max=C)
    out[contract.TOKEN_EMBEDDING] = run(TokenEmbedding(model), (torch.zeros(1, 2, dtype=torch.long, device=dev),),
                                        ({1: T},))
    out[contract.TEXT_DECODER] = run(TextDecoder(model), (torch.zeros(1, 2, E, dtype=dtype, device=dev),
                                                          torch.arange(2, device=dev)), ({1: T}, {0: T}))
    if cfg.vision is not None:
        side = cfg.vision.patch_size * cfg.vision.pooling_kernel_size
        if max_soft_tokens + 2 > C:
            raise ValueError(f"export_runner_methods: an image of max_soft_tokens={max_soft_tokens} takes "
                             f"{max_soft_tokens + 2} rows (boi, soft tokens, eoi), more than max_prefill_chunk={C}; "
                             "raise max_prefill_chunk or lower max_soft_tokens")
        cells = int(max_image_cells or min(max_soft_tokens, DEFAULT_MAX_IMAGE_CELLS))
        if cells < 2:
            raise ValueError(f"export_runner_methods: max_image_cells={cells} must be >= 2 (one cell on a side "
                             "would be a size-1 dimension, which traces as another graph)")
        # any size from 2 cells up to max_image_cells + 1 cells - 1 pixel a side (1 cell would trace apart);
        # guards like Eq(Mod(H, s), ...) hold for every size but are checked at run time instead of refused
        h = Dim("height", min=2 * side, max=(cells + 1) * side - 1)
        w = Dim("width", min=2 * side, max=(cells + 1) * side - 1)
        img = torch.zeros(3, 2 * side + 1, 3 * side + 2, dtype=torch.uint8, device=dev)  # not whole cells: the crop traced
        out[contract.VISION_ENCODER] = run(VisionEncoder(model, max_soft_tokens), (img,), ({1: h, 2: w},), deferred=True)
    if cfg.audio is not None:
        if not max_audio_frames:
            raise ValueError("export_runner_methods: the model has an audio tower; pass max_audio_frames= "
                             "(mel frames per clip the audio_encoder method accepts)")
        F = int(max_audio_frames)
        if audio_output_length(F) + 2 > C:
            raise ValueError(f"export_runner_methods: a clip of {F} frames gives {audio_output_length(F) + 2} rows, "
                             f"more than max_prefill_chunk={C}; raise the chunk or lower max_audio_frames")
        if F < MIN_AUDIO_FRAMES:
            raise ValueError(f"export_runner_methods: max_audio_frames={F} must be >= {MIN_AUDIO_FRAMES}")
        frames = Dim("frames", min=MIN_AUDIO_FRAMES, max=F)
        n_mels = cfg.audio.n_mels
        ex = torch.zeros(1, min(F, 13), n_mels, dtype=dtype, device=dev)
        # The padded length is ceil(F / u) * u: guards like (6 + 3m) % (2 + m) == 0 (m = ceil(F / u))
        # hold for every F but sympy cannot prove them; checked at run time instead of refused.
        out[contract.AUDIO_ENCODER] = run(AudioEncoder(model), (ex,), ({1: frames},), deferred=True)
    return out


def runner_metadata(model: nn.Module, max_prefill_chunk: int, *, max_soft_tokens: int,
                    max_image_cells: int | None = None, max_audio_frames: int | None = None,
                    extra_eos=()) -> dict:
    """Constant methods of the runner layout: the text contract's (``get_max_seq_len`` = C,
    ``get_max_context_len`` = KV positions, eos / bos / vocab) and the layout's own
    (:data:`fxport.contract.MULTIMODAL_CONSTANTS`). ``extra_eos``: the tokenizer's end ids too."""
    cfg = model.config
    t = cfg.text
    eos = list(t.eos_token_id) if isinstance(t.eos_token_id, (list, tuple)) else [t.eos_token_id]
    eos += [int(i) for i in extra_eos]
    meta = contract.runner_metadata(max_prefill_chunk=max_prefill_chunk, max_context_len=int(model.max_seq_len),
                                    eos_ids=eos, vocab_size=int(t.vocab_size), bos_id=int(t.bos_token_id),
                                    logits="last")
    H, PL = embedding_columns(cfg)
    meta.update({
        contract.HIDDEN_SIZE: H,
        contract.PER_LAYER_COLUMNS: PL,
        contract.EMBEDDING_DIM: H + PL + 1,
        contract.BIDIRECTIONAL_VISION: int(t.use_bidirectional_attention == "vision"),
        contract.IMAGE_TOKEN_ID: int(t.image_token_id),
        contract.BOI_TOKEN_ID: int(cfg.boi_token_id),
        contract.EOI_TOKEN_ID: int(cfg.eoi_token_id),
    })
    if cfg.vision is not None:
        meta.update({contract.PATCH_SIZE: int(cfg.vision.patch_size),
                     contract.POOLING_KERNEL_SIZE: int(cfg.vision.pooling_kernel_size),
                     contract.MAX_SOFT_TOKENS: int(max_soft_tokens),
                     contract.MAX_IMAGE_CELLS: int(max_image_cells or min(max_soft_tokens, DEFAULT_MAX_IMAGE_CELLS))})
    if cfg.audio is not None and t.audio_token_id is not None:
        meta.update({contract.AUDIO_TOKEN_ID: int(t.audio_token_id), contract.BOA_TOKEN_ID: int(cfg.boa_token_id),
                     contract.EOA_TOKEN_ID: int(cfg.eoa_token_id),
                     contract.MAX_AUDIO_FRAMES: int(max_audio_frames or 0)})
    return meta
