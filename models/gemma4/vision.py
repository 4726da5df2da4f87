"""Gemma 4 vision tower in plain eager PyTorch, with transformers' parameter names.

``features, valid = Gemma4VisionModel(config)(pixel_values, pixel_position_ids)``:
  * pixel_values (num_images, max_patches, 3 * patch**2) in [0, 1] (mapped to 2x - 1 here),
    patches row-major, each patch flattened (row, col, channel) as the HF image processor does;
  * pixel_position_ids (num_images, max_patches, 2) int64 as (column, row); padding patches are
    (-1, -1);
  * features (num_images, max_patches // k**2, hidden) with k = pooling_kernel_size: the
    pooled (k x k average), sqrt(hidden)-scaled and optionally standardized soft tokens;
    valid (num_images, max_patches // k**2) bool: True on pooled cells that hold real patches.

transformers drops the invalid cells with a boolean index (``hidden[mask]``, a data-dependent
shape). Here every shape depends on ``max_patches`` only: padding is handled by masks (key
padding mask in attention, zeroed padded rows before pooling, a one-hot pooling matrix built by
comparisons), so ``torch.export`` at a fixed ``max_patches`` gives one static graph with no
``nonzero`` / ``item`` / ``_assert_scalar``. The valid cells of an image are its first
``real_patches // k**2`` rows (the pooled grid is row-major over the real patches), which is
what :func:`compact_rows` and the runtime rely on to pass exactly the real soft tokens on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .clippable_linear import ClippableLinear
from .model import _ACT, RMSNorm, _f32


@dataclass(frozen=True)
class Gemma4VisionConfig:
    """The fields of transformers' ``Gemma4VisionConfig`` the tower reads (same names and defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Gemma4VisionConfig: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 4:
            raise ValueError(
                f"Gemma4VisionConfig: head_dim={self.head_dim} must be a multiple of 4 (2-D RoPE "
                "rotates two halves, each by pairs)."
            )
        if self.hidden_activation not in _ACT:
            raise ValueError(
                f"Gemma4VisionConfig: hidden_activation={self.hidden_activation!r} not in {sorted(_ACT)}"
            )

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


_FIELDS = tuple(f for f in Gemma4VisionConfig.__dataclass_fields__ if f != "rope_theta")


def vision_from_hf_config(hf_config: Any) -> Gemma4VisionConfig:
    """Gemma4VisionConfig from transformers' ``Gemma4VisionConfig`` or a ``Gemma4Config`` holding one."""
    vis = getattr(hf_config, "vision_config", hf_config)
    if vis is None or getattr(vis, "model_type", "") != "gemma4_vision":
        raise ValueError(
            f"vision_from_hf_config: expected a gemma4_vision config (or a Gemma4Config with "
            f"vision_config), got {type(hf_config).__name__} without one."
        )
    rope = dict(vis.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(
            f"vision_from_hf_config: rope_type {rope.get('rope_type')!r} is not supported; the "
            "Gemma 4 vision tower uses 'axial'."
        )
    return Gemma4VisionConfig(rope_theta=float(rope.get("rope_theta", 100.0)),
                              **{f: getattr(vis, f) for f in _FIELDS})


class PatchEmbedder(nn.Module):
    """Linear patch projection + learned (column, row) position embeddings (zero on padding)."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        H = config.hidden_size
        self.input_proj = nn.Linear(config.patch_dim, H, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, H))

    def forward(self, pixel_values: Tensor, positions: Tensor, padding: Tensor) -> Tensor:
        # pixel_values (N, P, 3p^2), positions (N, P, 2), padding (N, P) -> (N, P, H)
        w = self.input_proj.weight
        x = self.input_proj((2 * (pixel_values - 0.5)).to(w.dtype))
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        return x + pe.masked_fill(padding[..., None], 0.0)


def axial_rope(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (N, P, head_dim): channels [x, x, y, y] blocks of head_dim/4 frequencies each."""
    freqs = positions[..., None].float() * inv_freq  # (N, P, 2, D/4)
    fx, fy = freqs[..., 0, :], freqs[..., 1, :]
    emb = torch.cat([fx, fx, fy, fy], dim=-1)  # (N, P, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (N, P, heads, D); cos, sin (N, P, 1, D). Each half of D is rotated on its own (rotate_half
    # within the half): the first half by the column position, the second by the row.
    h = x.shape[-1] // 2
    q = h // 2
    parts = []
    for s in (slice(0, h), slice(h, 2 * h)):
        xs = x[..., s]
        rot = torch.cat((-xs[..., q:], xs[..., :q]), dim=-1)
        parts.append(xs * cos[..., s] + rot * sin[..., s])
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        H, D, clip, eps = config.hidden_size, config.head_dim, config.use_clipped_linears, config.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = ClippableLinear(H, self.n_heads * D, clip)
        self.k_proj = ClippableLinear(H, self.n_kv * D, clip)
        self.v_proj = ClippableLinear(H, self.n_kv * D, clip)
        self.o_proj = ClippableLinear(self.n_heads * D, H, clip)
        self.q_norm = RMSNorm(D, eps)
        self.k_norm = RMSNorm(D, eps)
        self.v_norm = RMSNorm(D, eps, with_scale=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> Tensor:
        # x (N, P, H); cos/sin (N, P, 1, D); key_mask (N, 1, 1, P) bool, True on real patches
        N, P, _ = x.shape
        q = _rotate_halves(self.q_norm(self.q_proj(x).view(N, P, self.n_heads, self.head_dim)), cos, sin)
        k = _rotate_halves(self.k_norm(self.k_proj(x).view(N, P, self.n_kv, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(N, P, self.n_kv, self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, heads, P, D)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)  # (N, heads, P, D)
        return self.o_proj(y.transpose(1, 2).reshape(N, P, self.n_heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        H, I, clip = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(H, I, clip)
        self.up_proj = ClippableLinear(H, I, clip)
        self.down_proj = ClippableLinear(I, H, clip)
        self.act = _ACT[config.hidden_activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionRotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` (head_dim/4,) non-persistent, as transformers."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        half = config.head_dim // 2
        inv = 1.0 / config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)
        self.register_buffer("inv_freq", inv, persistent=False)


class VisionEncoder(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.rotary_emb = VisionRotaryEmbedding(config)
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, positions: Tensor, padding: Tensor) -> Tensor:
        cos, sin = axial_rope(positions, self.rotary_emb.inv_freq, x.dtype)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (N, P, 1, D)
        key_mask = (~padding)[:, None, None, :]  # (N, 1, 1, P)
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask)
        return x


class Gemma4VisionModel(nn.Module):
    """Patch embedding, bidirectional encoder, k x k position pooling (see the module docstring)."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def pool(self, x: Tensor, positions: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """(N, P, H) -> pooled (N, P // k^2, H) float32 (not yet scaled), valid (N, P // k^2)."""
        k = self.config.pooling_kernel_size
        out_len = x.shape[1] // (k * k)
        x = x.masked_fill(padding[..., None], 0.0)
        if out_len == x.shape[1]:
            return x.float(), ~padding
        pos = positions.clamp(min=0)
        cols = pos[..., 0].amax(dim=-1, keepdim=True) + 1  # (N, 1): grid width of the real patches
        cell = torch.div(pos, k, rounding_mode="floor")  # (N, P, 2)
        cell = cell[..., 0] + torch.div(cols, k, rounding_mode="floor") * cell[..., 1]  # (N, P)
        onehot = cell[..., None] == torch.arange(out_len, device=x.device)  # (N, P, out_len)
        weights = onehot.float() / (k * k)
        pooled = weights.transpose(1, 2) @ x.float()  # (N, out_len, H)
        return pooled, onehot.any(dim=1)

    def forward(self, pixel_values: Tensor, pixel_position_ids: Tensor) -> tuple[Tensor, Tensor]:
        k = self.config.pooling_kernel_size
        if pixel_values.shape[-2] % (k * k):
            raise ValueError(
                f"Gemma4VisionModel: {pixel_values.shape[-2]} patches per image is not a multiple of "
                f"pooling_kernel_size**2 = {k * k}; pad the patches to a multiple (max_soft_tokens * {k * k})."
            )
        padding = (pixel_position_ids == -1).all(dim=-1)  # (N, P)
        x = self.patch_embedder(pixel_values, pixel_position_ids, padding)
        x = self.encoder(x, pixel_position_ids, padding)
        pooled, valid = self.pool(x, pixel_position_ids, padding)
        h = pooled * self.config.hidden_size**0.5  # float32, as transformers scales before casting
        if self.config.standardize:
            h = (h - _f32(self.std_bias)) * _f32(self.std_scale)
        return h.to(x.dtype), valid


class Gemma4MultimodalEmbedder(nn.Module):
    """Soft tokens -> text hidden size: scale-free RMSNorm, then a linear projection (HF names)."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, text_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def compact_rows(features: Tensor, valid: Tensor) -> Tensor:
    """(N, M, H) features + (N, M) valid -> (N*M, H): the valid rows first, in order, then zeros.

    transformers' ``features[valid]`` with a static shape: row j of the result is the j-th valid
    row, picked by a 0/1 selection matrix (exact: one nonzero term per output row).
    """
    H = features.shape[-1]
    flat, ok = features.reshape(-1, H), valid.reshape(-1)
    rank = torch.cumsum(ok.long(), 0) - 1  # (R,) index of each valid row among the valid ones
    target = torch.arange(flat.shape[0], device=flat.device)[:, None]  # (R, 1)
    select = (rank[None, :] == target) & ok[None, :]  # (R_out, R_in)
    return select.to(flat.dtype) @ flat
