"""Gemma 4 multimodal model (text decoder + vision tower + audio tower) in plain eager PyTorch.

Parameter names are transformers' ``Gemma4ForConditionalGeneration``: ``model.language_model.*``
(the text decoder of :mod:`.model`), ``model.vision_tower.*``, ``model.embed_vision.*``,
``model.audio_tower.*``, ``model.embed_audio.*``, ``lm_head.weight`` (tied to the token
embedding), so an HF ``state_dict`` loads with ``strict=True``.

The forms, all static-shape (no boolean indexing, nonzero, item):
  * ``encode_images(pixel_values, image_position_ids) -> (features (N, M, H), valid (N, M))``:
    vision tower + ``embed_vision``; M = max_patches / k**2 slots per image, the valid ones
    first (``real_patches / k**2`` of them).
  * ``encode_audio(input_features, input_features_mask) -> (features (B, T', H), valid (B, T'))``.
  * ``forward(tokens, input_pos, image_features=None, audio_features=None) -> logits``: the
    prefill / decode step. Features are the rows for this chunk's placeholders, in order
    ((n, H), e.g. ``compact_rows(*encode_images(...))``). As transformers: every placeholder
    id (image, video, audio) is replaced by ``pad_token_id`` before the token and per-layer
    embedding lookups, then the features are merged with ``masked_scatter`` on
    ``tokens == image_token_id`` / ``audio_token_id`` (the form FixedSlotFusion rewrites), and
    with ``use_bidirectional_attention == "vision"`` sliding layers see each run of vision
    tokens both ways.
  * ``generate_step(tokens, input_pos, pixel_values=..., image_position_ids=..., input_features=
    ..., input_features_mask=...)``: encoders + compaction + forward, for parity with
    transformers' ``Gemma4ForConditionalGeneration.forward``.
Each image is ``boi + image_token * n + eoi`` in the prompt (n = real patches / k**2), each audio
clip ``boa + audio_token * n + eoa`` (n = valid frames after the two stride-2 subsamplings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .config import Gemma4Config
from .config import from_hf_config as text_from_hf_config
from .model import Gemma4TextModel, _cast, _f32
from .vision import Gemma4MultimodalEmbedder, Gemma4VisionConfig, Gemma4VisionModel, compact_rows, vision_from_hf_config


@dataclass
class Gemma4MultimodalConfig:
    """Text config + optional vision / audio tower configs + the special token ids."""

    text: Gemma4Config
    vision: Gemma4VisionConfig | None = None
    audio: Any = None  # fxport.models.gemma4.audio.Gemma4AudioConfig
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883

    @property
    def image_token_id(self) -> int:
        return self.text.image_token_id

    @property
    def audio_token_id(self) -> int | None:
        return self.text.audio_token_id

    def placeholder_ids(self) -> list[int]:
        t = self.text
        return [i for i in (t.image_token_id, t.video_token_id, t.audio_token_id) if i is not None]

    def replace(self, **changes: Any) -> "Gemma4MultimodalConfig":
        return dataclasses.replace(self, **changes)


def multimodal_from_hf_config(hf_config: Any) -> Gemma4MultimodalConfig:
    """Convert transformers' top-level ``Gemma4Config`` (text + optional vision / audio)."""
    if getattr(hf_config, "model_type", "") != "gemma4":
        raise ValueError(
            f"multimodal_from_hf_config: expected a transformers Gemma4Config (model_type 'gemma4'), "
            f"got {type(hf_config).__name__} with model_type {getattr(hf_config, 'model_type', None)!r}."
        )
    vision = vision_from_hf_config(hf_config) if hf_config.vision_config is not None else None
    audio = None
    if hf_config.audio_config is not None:
        from .audio import from_hf_config as audio_from_hf_config

        audio = audio_from_hf_config(hf_config)
    return Gemma4MultimodalConfig(
        text=text_from_hf_config(hf_config),
        vision=vision,
        audio=audio,
        boi_token_id=hf_config.boi_token_id,
        eoi_token_id=hf_config.eoi_token_id,
        boa_token_id=hf_config.boa_token_id,
        eoa_token_id=hf_config.eoa_token_index,
    )


class Gemma4MultimodalModel(nn.Module):
    """``model.*`` of transformers' ``Gemma4ForConditionalGeneration``: towers, embedders, decoder."""

    def __init__(self, config: Gemma4MultimodalConfig, max_batch_size: int, max_seq_len: int):
        super().__init__()
        self.config = config
        H = config.text.hidden_size
        self.language_model = Gemma4TextModel(config.text, max_batch_size, max_seq_len)
        self.vision_tower = self.embed_vision = None
        if config.vision is not None:
            self.vision_tower = Gemma4VisionModel(config.vision)
            self.embed_vision = Gemma4MultimodalEmbedder(config.vision.hidden_size, H, config.vision.rms_norm_eps)
        self.audio_tower = self.embed_audio = None
        if config.audio is not None:
            from .audio import Gemma4AudioModel

            self.audio_tower = Gemma4AudioModel(config.audio)
            self.embed_audio = Gemma4MultimodalEmbedder(config.audio.output_proj_dims, H, config.audio.rms_norm_eps)

    def forward(self, tokens: Tensor, input_pos: Tensor, image_features: Tensor | None = None,
                audio_features: Tensor | None = None) -> Tensor:
        cfg = self.config.text
        lm = self.language_model
        placeholder = None
        for pid in self.config.placeholder_ids():
            hit = tokens == pid
            placeholder = hit if placeholder is None else placeholder | hit
        ids = tokens if placeholder is None else tokens.masked_fill(placeholder, cfg.pad_token_id)
        embeds = lm.embed_tokens(ids)  # (B, L, H)
        for pid, feats in ((cfg.image_token_id, image_features), (cfg.audio_token_id, audio_features)):
            if feats is not None:
                mask = (tokens == pid)[..., None].expand_as(embeds)
                embeds = embeds.masked_scatter(mask, _cast(feats, embeds.dtype))
        vision = None
        if cfg.use_bidirectional_attention == "vision":
            vision = tokens == cfg.image_token_id
            if cfg.video_token_id is not None:
                vision = vision | (tokens == cfg.video_token_id)
        return lm.forward_embeds(embeds, ids, input_pos, vision)


class Gemma4ForConditionalGeneration(nn.Module):
    """Gemma 4 with vision (and audio) towers and static KV caches; see the module docstring."""

    def __init__(self, config: Gemma4MultimodalConfig, max_seq_len: int = 2048, max_batch_size: int = 1):
        super().__init__()
        self.config, self.max_seq_len, self.max_batch_size = config, max_seq_len, max_batch_size
        self.model = Gemma4MultimodalModel(config, max_batch_size, max_seq_len)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- encoders ------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor, image_position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(N, P, 3p^2) in [0, 1], (N, P, 2) -> soft tokens (N, P/k^2, hidden), valid (N, P/k^2)."""
        if self.model.vision_tower is None:
            raise ValueError("Gemma4ForConditionalGeneration: this model has no vision tower (config.vision is None).")
        feats, valid = self.model.vision_tower(pixel_values, image_position_ids)
        return self.model.embed_vision(feats), valid

    def encode_audio(self, input_features: Tensor, input_features_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, n_mels), (B, T) bool -> soft tokens (B, T', hidden), valid (B, T')."""
        if self.model.audio_tower is None:
            raise ValueError("Gemma4ForConditionalGeneration: this model has no audio tower (config.audio is None).")
        feats, valid = self.model.audio_tower(input_features, input_features_mask)
        return self.model.embed_audio(feats), valid

    # ---- decoder -------------------------------------------------------------------------
    def forward(self, tokens: Tensor, input_pos: Tensor, image_features: Tensor | None = None,
                audio_features: Tensor | None = None) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != self.max_batch_size:
            raise ValueError(
                f"Gemma4ForConditionalGeneration: tokens must be (max_batch_size={self.max_batch_size}, L), "
                f"got {tuple(tokens.shape)}."
            )
        if input_pos.shape != (tokens.shape[1],):
            raise ValueError(
                f"Gemma4ForConditionalGeneration: input_pos must be (L,) = ({tokens.shape[1]},), got "
                f"{tuple(input_pos.shape)}."
            )
        logits = self.lm_head(self.model(tokens, input_pos, image_features, audio_features))
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return _f32(logits)

    def generate_step(self, tokens: Tensor, input_pos: Tensor, pixel_values: Tensor | None = None,
                      image_position_ids: Tensor | None = None, input_features: Tensor | None = None,
                      input_features_mask: Tensor | None = None) -> Tensor:
        """Encoders, compaction of their valid rows, then :meth:`forward` (one chunk holding
        every placeholder of the given images / clips)."""
        image = audio = None
        if pixel_values is not None:
            image = compact_rows(*self.encode_images(pixel_values, image_position_ids))
        if input_features is not None:
            audio = compact_rows(*self.encode_audio(input_features, input_features_mask))
        return self(tokens, input_pos, image, audio)

    def reset_caches(self) -> None:
        for name, buf in self.named_buffers():
            if name.endswith(("k_cache", "v_cache")):
                buf.zero_()


def image_placeholders(config: Gemma4MultimodalConfig, num_soft_tokens: int) -> list[int]:
    """``boi + image_token * n + eoi``: the token ids one image occupies in the prompt."""
    return [config.boi_token_id] + [config.image_token_id] * num_soft_tokens + [config.eoi_token_id]


def audio_placeholders(config: Gemma4MultimodalConfig, num_soft_tokens: int) -> list[int]:
    """``boa + audio_token * n + eoa``: the token ids one audio clip occupies in the prompt."""
    if config.audio_token_id is None:
        raise ValueError("audio_placeholders: the config has no audio_token_id.")
    return [config.boa_token_id] + [config.audio_token_id] * num_soft_tokens + [config.eoa_token_id]


def load_hf_multimodal(path: Any, max_seq_len: int = 2048, dtype: torch.dtype | None = None,
                       progress: bool = False) -> Gemma4ForConditionalGeneration:
    """A ``Gemma4ForConditionalGeneration`` Hugging Face directory (config.json + safetensors)
    as an eager model. Needs transformers (the ``[hf]`` extra) to read the config.

    Every tensor of the model must be in the checkpoint (``lm_head.weight`` may be absent when
    tied); the only extra tensors allowed are the K/V projections and norms of KV-shared layers,
    which transformers also ignores. Anything else is a :class:`CheckpointError` naming it.
    """
    import re
    from pathlib import Path

    from .load import CheckpointError, load_safetensors_dir

    path = Path(path)
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - the [hf] extra
        raise CheckpointError("load_hf_multimodal: reading a Hugging Face config needs transformers; "
                              "pip install 'fxport[hf]'.") from None
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face Gemma 4 checkpoint directory.")
    hf_config = AutoConfig.from_pretrained(str(path))
    config = multimodal_from_hf_config(hf_config)
    model = Gemma4ForConditionalGeneration(config, max_seq_len=max_seq_len)
    state = load_safetensors_dir(path, dtype=dtype, progress=progress)
    shared = {i for i in range(config.text.num_hidden_layers) if config.text.kv_source(i) is not None}
    ignorable = re.compile(r"model\.language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
    extra = [k for k in state if k not in model.state_dict()]
    bad = [k for k in extra if not ((m := ignorable.match(k)) and int(m.group(1)) in shared)]
    if bad:
        raise CheckpointError(f"{path}: tensors the model does not have: {bad[:4]} ({len(bad)} in all); "
                              "is this a Gemma 4 checkpoint of this transformers version?")
    for k in extra:
        del state[k]
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.text.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:4]} ({len(missing)} in all); the checkpoint "
                              "is incomplete or for another architecture.")
    if dtype is not None:
        model.to(dtype)
    return model.eval()
