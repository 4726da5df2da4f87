"""Gemma 4 audio tower (USM-style conformer) in plain eager PyTorch.

Parameter names are transformers' ``Gemma4AudioModel`` (inside the multimodal model they sit
under ``model.audio_tower.``), so an HF ``state_dict`` loads with ``strict=True``.

``features, mask = Gemma4AudioModel(config)(input_features, input_features_mask)``:
  * input_features (B, T, n_mels) log-mel frames (the HF feature extractor's output),
    input_features_mask (B, T) bool, True on real frames;
  * two Conv2d(3x3, stride 2, pad 1) subsamplings: T' = ceil(ceil(T / 2) / 2), the mask is
    subsampled as ``mask[:, ::2][:, ::2]``;
  * conformer layers (half-step FFN, chunked local self-attention with a relative position
    bias and a tanh logit cap, causal depthwise conv block, half-step FFN), every projection
    clipped by the checkpoint's ``input_min/max`` / ``output_min/max`` buffers;
  * features (B, T', output_proj_dims), mask (B, T') bool. Padded positions are computed as
    transformers computes them (the caller keeps the ``mask``-true rows: ``num_audio_tokens``).

Export: shapes depend on T only; the attention mask is built from aranges, pads and slices of
the frame mask (no nonzero / item / boolean indexing), so ``torch.export`` at a fixed T gives
one static graph (:func:`audio_encoder_method`). Attention runs as 3-D bmm's over (batch, head,
block) and key windows are slices of the padded blocks: forms XNNPACK delegates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .clippable_linear import ClippableLinear
from .model import _ACT, RMSNorm, _f32


@dataclass(frozen=True)
class Gemma4AudioConfig:
    """The fields of transformers' ``Gemma4AudioConfig`` the tower reads (same names, same defaults)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    def __post_init__(self) -> None:
        object.__setattr__(self, "subsampling_conv_channels", tuple(self.subsampling_conv_channels))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Gemma4AudioConfig: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}; pick sizes that divide."
            )
        if self.hidden_act not in _ACT:
            raise ValueError(f"Gemma4AudioConfig: hidden_act={self.hidden_act!r} not in {sorted(_ACT)}")
        if len(self.subsampling_conv_channels) != 2:
            raise ValueError(
                f"Gemma4AudioConfig: subsampling_conv_channels={self.subsampling_conv_channels} must "
                "have two entries (the tower has two stride-2 convolutions)."
            )

    @property
    def n_mels(self) -> int:
        """Mel bins the input projection expects: 4 x (subsampled frequency bins) = channels[0] // 4 * 4."""
        return self.subsampling_conv_channels[0] // 4 * 4

    @property
    def context_size(self) -> int:
        """Keys each query block sees: chunk + (left - 1) past + right future frames."""
        return self.attention_chunk_size + self.attention_context_left - 1 + self.attention_context_right


_FIELDS = tuple(Gemma4AudioConfig.__dataclass_fields__)


def from_hf_config(hf_config: Any) -> Gemma4AudioConfig:
    """Gemma4AudioConfig from transformers' ``Gemma4AudioConfig`` or a ``Gemma4Config`` holding one."""
    audio = getattr(hf_config, "audio_config", hf_config)
    if audio is None or getattr(audio, "model_type", "") != "gemma4_audio":
        raise ValueError(
            f"audio.from_hf_config: expected a gemma4_audio config (or a Gemma4Config with "
            f"audio_config), got {type(hf_config).__name__} without one."
        )
    return Gemma4AudioConfig(**{f: getattr(audio, f) for f in _FIELDS})


def audio_output_length(num_frames: int) -> int:
    """Soft-token slots after the two stride-2 subsamplings of ``num_frames`` mel frames."""
    for _ in range(2):
        num_frames = (num_frames + 2 * 1 - 3) // 2 + 1  # Conv2d kernel 3, stride 2, pad 1
    return num_frames


def subsample_mask(mask: Tensor) -> Tensor:
    """(B, T) frame mask -> (B, T') token mask, as the two subsampling layers do."""
    return mask[:, ::2][:, ::2]


def num_audio_tokens(input_features_mask: Tensor) -> Tensor:
    """(B,) int64 audio soft tokens per clip: ``audio_token`` placeholders the prompt needs."""
    return subsample_mask(input_features_mask).sum(-1)


class SubSampleLayer(nn.Module):
    """Zero padded frames, Conv2d 3x3 stride 2, LayerNorm over channels (no bias), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_ch, eps=eps, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # x (B, C_in, T, F), mask (B, T) -> (B, C_out, ceil(T/2), ceil(F/2)), (B, ceil(T/2))
        x = x * mask[:, None, :, None].to(x.dtype)
        x = self.conv(x)
        x = F.relu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear(c0 // 4 * c1, config.hidden_size, bias=False)

    def forward(self, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # feats (B, T, M) -> (B, T', hidden); mask (B, T) -> (B, T')
        x, mask = self.layer0(feats.unsqueeze(1), mask)
        x, mask = self.layer1(x, mask)  # (B, C1, T', M')
        B, C1, S, M = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, S, M * C1)
        return self.input_proj_linear(x), mask


class RelPositionalEncoding(nn.Module):
    """Sinusoids [sin | cos] for relative distances context//2 .. 0 (a constant, computed once)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        n = config.hidden_size // 2
        inv = torch.exp(torch.arange(n) * -(math.log(10000.0) / max(n - 1, 1)))  # (hidden/2,)
        pos = torch.arange(config.context_size // 2, -1, -1)[:, None]  # (P, 1), P = context//2 + 1
        t = pos * inv[None, None]  # (1, P, hidden/2)
        self.register_buffer("pos_embed", torch.cat([t.sin(), t.cos()], -1)[0], persistent=False)

    def forward(self, dtype: torch.dtype) -> Tensor:
        return self.pos_embed.to(dtype)  # (P, hidden)


class AudioAttention(nn.Module):
    """Chunked local attention: blocks of C queries see W = C + left - 1 + right keys.

    logits = q.k (ac) + q.r (bd, relative-position keys rel-shifted into place); tanh cap;
    masked logits are set to ``attention_invalid_logits_value`` (a finite value, as HF).
    """

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        h, clip = config.hidden_size, config.use_clipped_linears
        self.n_heads = config.num_attention_heads
        self.head_dim = h // self.n_heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.context = config.context_size
        self.cap = config.attention_logit_cap
        self.invalid = config.attention_invalid_logits_value
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = ClippableLinear(h, h, clip)
        self.k_proj = ClippableLinear(h, h, clip)
        self.v_proj = ClippableLinear(h, h, clip)
        self.post = ClippableLinear(h, h, clip)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def forward(self, x: Tensor, pos_embed: Tensor, keep: Tensor, fill: Tensor) -> Tensor:
        # x (B, S, hidden), pos_embed (P, hidden); keep (B, 1, nb, C, W) 1.0 where the query may
        # read the key, fill = (1 - keep) * invalid (``logits * keep + fill`` is masked_fill exactly:
        # the capped logits are finite). Matmuls are 3-D bmm's, windows are slices: what XNNPACK takes.
        B, S, _ = x.shape
        H, D, C, W = self.n_heads, self.head_dim, self.chunk, self.context
        nb = keep.shape[2]
        q = _f32(self.q_proj(x)).view(B, S, H, D) * self.q_scale * F.softplus(self.per_dim_scale)
        k = _f32(self.k_proj(x)).view(B, S, H, D) * self.k_scale
        v = _f32(self.v_proj(x)).view(B, S, H, D)
        q = F.pad(q, (0, 0, 0, 0, 0, nb * C - S)).view(B, nb, C, H, D).permute(0, 3, 1, 2, 4)  # (B, H, nb, C, D)
        k = block_windows(k, C, self.past, W, nb).permute(0, 3, 1, 4, 2)  # (B, H, nb, D, W)
        v = block_windows(v, C, self.past, W, nb).permute(0, 3, 1, 2, 4)  # (B, H, nb, W, D)
        ac = torch.bmm(q.reshape(B * H * nb, C, D), k.reshape(B * H * nb, D, W)).view(B, H, nb, C, W)
        r = _f32(self.relative_k_proj(pos_embed)).view(-1, H, D).permute(1, 2, 0)  # (H, D, P)
        P = r.shape[-1]
        bd = torch.bmm(q.permute(1, 0, 2, 3, 4).reshape(H, B * nb * C, D), r)  # (H, B*nb*C, P)
        bd = bd.view(H, B, nb, C, P).permute(1, 0, 2, 3, 4)  # (B, H, nb, C, P)
        # relative shift: row i of a block moves left by i, giving (B, H, nb, C, W)
        bd = F.pad(bd, (0, W + 1 - P)).reshape(B, H, nb, C * (W + 1))[..., : C * W].view(B, H, nb, C, W)
        logits = torch.tanh((ac + bd) / self.cap) * self.cap
        probs = torch.softmax(logits * keep + fill, dim=-1)  # (B, H, nb, C, W)
        out = torch.bmm(probs.reshape(B * H * nb, C, W), v.reshape(B * H * nb, W, D))  # (B*H*nb, C, D)
        out = out.view(B, H, nb * C, D).permute(0, 2, 1, 3).reshape(B, nb * C, H * D)[:, :S]  # (B, S, hidden)
        return self.post(out.to(x.dtype))


def block_windows(x: Tensor, chunk: int, past: int, width: int, nb: int) -> Tensor:
    """(B, S, *rest) -> (B, nb, width, *rest): window blk = x[blk*chunk - past : ... + width],
    zeros (False) outside [0, S). Built from k = ceil(width / chunk) shifted views of the padded
    blocks (slices and one cat; no unfold, which XNNPACK does not take)."""
    B, S = x.shape[:2]
    k = -(-width // chunk)
    total = (nb + k - 1) * chunk
    pad = [0, 0] * (x.dim() - 2) + [past, total - past - S]
    blocks = F.pad(x, pad).view(B, nb + k - 1, chunk, *x.shape[2:])
    win = blocks[:, :nb] if k == 1 else torch.cat([blocks[:, j : j + nb] for j in range(k)], dim=2)
    return win[:, :, :width]


class FeedForward(nn.Module):
    """Half-step FFN: clamp, RMSNorm, 4x linear, act, linear, clamp, RMSNorm, * residual_weight."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        h, clip = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, clip)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, clip)
        self.pre_layer_norm = RMSNorm(h, 1e-6)  # HF builds these with the default eps
        self.post_layer_norm = RMSNorm(h, 1e-6)
        self.act = _ACT[config.hidden_act]
        self.clip = config.gradient_clipping
        self.scale = config.residual_weight

    def forward(self, x: Tensor) -> Tensor:
        c = min(self.clip, torch.finfo(x.dtype).max)
        y = self.pre_layer_norm(x.clamp(-c, c))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        return self.post_layer_norm(y.clamp(-c, c)) * self.scale + x


class LightConv1d(nn.Module):
    """RMSNorm, linear to 2x, GLU, causal depthwise conv, clamp, RMSNorm, act, linear; residual."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        h, clip, eps = config.hidden_size, config.use_clipped_linears, config.rms_norm_eps
        self.linear_start = ClippableLinear(h, 2 * h, clip)
        self.linear_end = ClippableLinear(h, h, clip)
        self.depthwise_conv1d = nn.Conv1d(h, h, config.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, eps)
        self.conv_norm = RMSNorm(h, eps)
        self.act = _ACT[config.hidden_act]
        self.clip = config.gradient_clipping
        self.left_pad = config.conv_kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:
        # x (B, S, hidden)
        y = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        y = self.depthwise_conv1d(F.pad(y.transpose(1, 2), (self.left_pad, 0))).transpose(1, 2)
        c = min(self.clip, torch.finfo(y.dtype).max)
        y = self.act(self.conv_norm(y.clamp(-c, c)))
        return self.linear_end(y) + x


class AudioLayer(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        h = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = AudioAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = RMSNorm(h, 1e-6)
        self.norm_post_attn = RMSNorm(h, 1e-6)
        self.norm_out = RMSNorm(h, 1e-6)
        self.clip = config.gradient_clipping

    def forward(self, x: Tensor, pos_embed: Tensor, keep: Tensor, fill: Tensor) -> Tensor:
        c = min(self.clip, torch.finfo(self.norm_pre_attn.weight.dtype).max)
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(x.clamp(-c, c)), pos_embed, keep, fill)
        x = self.norm_post_attn(a.clamp(-c, c)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(x.clamp(-c, c))


class Gemma4AudioModel(nn.Module):
    """The audio tower: subsampling, conformer layers, output projection (see the module docstring)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.rel_pos_enc = RelPositionalEncoding(config)
        self.layers = nn.ModuleList(AudioLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def attention_allowed(self, mask: Tensor) -> Tensor:
        """(B, S) token mask -> (B, 1, nb, C, W) bool: query blk*C+i may read key blk*C+o-past.

        As transformers: keys must be real tokens inside [0, S); the distance d = q - k must
        satisfy 0 <= d < left - 1 or 0 < -d < right; queries past S see nothing.
        """
        cfg = self.config
        C, W, past = cfg.attention_chunk_size, cfg.context_size, cfg.attention_context_left - 1
        B, S = mask.shape
        nb = (S + C - 1) // C
        dev = mask.device
        i = torch.arange(C, device=dev)[:, None]
        o = torch.arange(W, device=dev)[None, :]
        d = i - o + past  # (C, W) q - k
        window = ((d >= 0) & (d < past)) | ((d < 0) & (-d < cfg.attention_context_right))
        q_real = (torch.arange(nb * C, device=dev) < S).view(nb, C, 1)
        keys = block_windows(mask, C, past, W, nb)  # (B, nb, W): key o of block blk is real
        return (window & q_real & keys[:, :, None, :])[:, None]

    def forward(self, input_features: Tensor, input_features_mask: Tensor) -> tuple[Tensor, Tensor]:
        # input_features (B, T, M), input_features_mask (B, T) bool
        M, want = input_features.shape[-1], self.config.subsampling_conv_channels[0] // 4
        if (M + 3) // 4 != want:
            raise ValueError(
                f"Gemma4AudioModel: input_features has {M} mel bins but the input projection expects "
                f"{want * 4} (ceil(n_mels / 4) == subsampling_conv_channels[0] // 4 = {want}); "
                "use the feature extractor's feature_size that matches the checkpoint."
            )
        mask = input_features_mask.to(torch.bool)
        x, mask = self.subsample_conv_projection(input_features, mask)  # (B, S, hidden), (B, S)
        pos = self.rel_pos_enc(x.dtype)
        keep = self.attention_allowed(mask).to(x.dtype)  # (B, 1, nb, C, W)
        fill = (1.0 - keep) * self.config.attention_invalid_logits_value
        for layer in self.layers:
            x = layer(x, pos, keep, fill)
        return self.output_proj(x), mask  # (B, S, output_proj_dims), (B, S)


# ----------------------------------------------------------------------------- export


class AudioEncoder(nn.Module):
    """The ``audio_encoder`` method: tower, then (when given) the embedder into text space.

    forward(input_features (B, T, n_mels), input_features_mask (B, T) bool)
      -> features (B, T', D), mask (B, T') bool; D = the embedder's output size (text hidden)
         or output_proj_dims without one. Rows where mask is False are padding: the caller
         keeps the first ``num_audio_tokens`` rows (right-padded clips) for the prompt.
    """

    def __init__(self, tower: Gemma4AudioModel, embedder: nn.Module | None = None):
        super().__init__()
        self.audio_tower = tower
        self.embed_audio = embedder

    def forward(self, input_features: Tensor, input_features_mask: Tensor) -> tuple[Tensor, Tensor]:
        x, mask = self.audio_tower(input_features, input_features_mask)
        if self.embed_audio is not None:
            x = self.embed_audio(x)
        return x, mask


def audio_encoder_method(tower: Gemma4AudioModel, max_frames: int, embedder: nn.Module | None = None,
                         batch: int = 1, strict: bool = False):
    """``torch.export`` of :class:`AudioEncoder` at fixed shapes, in functional ATen IR.

    Inputs: input_features (batch, max_frames, n_mels) in the tower's dtype, input_features_mask
    (batch, max_frames) bool (shorter clips are padded to max_frames with mask False).
    Outputs: features (batch, audio_output_length(max_frames), D), mask (batch, T') bool.
    """
    if max_frames < 1:
        raise ValueError(f"audio_encoder_method: max_frames={max_frames} must be >= 1 (mel frames per clip).")
    p = next(tower.parameters())
    cfg = tower.config
    feats = torch.zeros(batch, max_frames, cfg.n_mels, dtype=p.dtype, device=p.device)
    mask = torch.ones(batch, max_frames, dtype=torch.bool, device=p.device)
    module = AudioEncoder(tower, embedder).eval()
    ep = torch.export.export(module, (feats, mask), strict=strict)
    return ep.run_decompositions({})
