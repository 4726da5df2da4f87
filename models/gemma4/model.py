"""Gemma 4 (and Gemma 3) text decoder in plain eager PyTorch, gpt-fast style.

Parameter names are transformers' (``Gemma4ForCausalLM`` / ``Gemma3ForCausalLM``), so an HF
``state_dict`` loads with ``load_state_dict``; ``lm_head.weight`` is tied to
``model.embed_tokens.weight`` when ``config.tie_word_embeddings``.

Contract (shared with the passes; see the team brief):
  * ``logits = model(tokens, input_pos, mm_features=None)``; tokens (B, L) int64 with
    B == max_batch_size, input_pos (L,) int64 contiguous absolute positions, mm_features
    (N, hidden) or None -> logits (B, L, vocab) float32.
  * KV caches are plain full-length buffers ``model.layers.{i}.self_attn.k_cache`` /
    ``v_cache`` of shape (B, H_kv, max_seq_len, D), written with ``index_copy_(2, input_pos,
    ·)``. KV-shared layers own no cache; they read the cache of ``config.kv_source(i)``.
  * Attention reads the whole cache, expands K/V to H_q with unsqueeze(2) -> expand ->
    reshape (skipped when H_q == H_kv) and calls SDPA with a bool mask (1, 1, L, S) built
    once per forward from input_pos and arange(S): full layers k_pos <= q_pos, sliding
    layers additionally q_pos - k_pos < sliding_window.
  * Multimodal merge as transformers: mask = tokens == image_token_id; embeds =
    embed_tokens(tokens) * sqrt(hidden); embeds.masked_scatter(mask[..., None].expand_as(
    embeds), mm_features). The PLE lookup (Gemma 4) uses pad_token_id at those positions,
    as transformers' Gemma4Model does.
No export tricks live here (no ring buffers, custom ops or where-merges): that is the passes'
job. ``torch.no_grad()`` is the caller's job.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import FULL, SLIDING, Gemma4Config

_ACT = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    # x in dtype; no cast node in the exported graph when it already is.
    return x if x.dtype == dtype else x.to(dtype)


def _f32(x: Tensor) -> Tensor:
    return _cast(x, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm in fp32; scale ``weight`` (Gemma 4), ``1 + weight`` (Gemma 3) or none."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False, with_scale: bool = True):
        super().__init__()
        self.eps, self.unit_offset, self.with_scale = eps, unit_offset, with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * scale, all in fp32 (one aten.rms_norm node)
        w = None
        if self.with_scale:
            w = 1.0 + _f32(self.weight) if self.unit_offset else _f32(self.weight)
        y = F.rms_norm(_f32(x), (x.shape[-1],), w, self.eps)
        return _cast(y, x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Embedding times a constant scale held in the weight dtype (as transformers rounds it)."""

    def __init__(self, num: int, dim: int, padding_idx: int, scale: float):
        super().__init__(num, dim, padding_idx)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * _cast(self.embed_scale, self.weight.dtype)


def rope_inv_freq(head_dim: int, theta: float, partial: float, scaling: float) -> Tensor:
    """(head_dim/2,) inverse frequencies; zeros past the rotated fraction (proportional RoPE)."""
    n_rot = int(partial * head_dim // 2)
    inv = 1.0 / theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim)
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - n_rot)])
    return inv / scaling


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, H, L, D); cos, sin (L, D)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: Gemma4Config, layer_idx: int, max_batch_size: int, max_seq_len: int):
        super().__init__()
        t = config.layer_types[layer_idx]
        self.layer_type, self.is_sliding = t, t == SLIDING
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads_for(t)
        self.head_dim = config.head_dim_for(t)
        self.scale = config.attention_scale
        self.kv_source = config.kv_source(layer_idx)  # None: owns its cache
        hidden, hd, eps, off = config.hidden_size, self.head_dim, config.rms_norm_eps, config.norm_unit_offset
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * hd, bias=bias)
        self.q_norm = RMSNorm(hd, eps, off)
        if self.kv_source is None:
            k_eq_v = config.attention_k_eq_v and t == FULL
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
            self.v_proj = None if k_eq_v else nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
            self.k_norm = RMSNorm(hd, eps, off)
            self.v_norm = RMSNorm(hd, eps, with_scale=False) if config.use_v_norm else None
            shape = (max_batch_size, self.n_kv_heads, max_seq_len, hd)  # (B, H_kv, S, D)
            self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
            self._rope_args = config.rope_for(t)
        self.o_proj = nn.Linear(self.n_heads * hd, hidden, bias=bias)

    def derive_keys_from_values(self) -> bool:
        """k_eq_v layer: drop ``k_cache`` and compute the keys from ``v_cache`` at every step.

        With k_eq_v both come from the same projection: K = rope(k_norm(raw)) and V =
        v_norm(raw) (or raw), so K = rope(V * k_norm scale) (v_norm, scale-free, is the same
        RMS normalization; bit-exact in fp32) or rope(k_norm(V)), RoPE taken at every cache
        slot's position. Saves the K cache (31B at 128K: 5 GiB) for a recompute over the
        cache per step. Returns False (nothing changed) for other layers.
        """
        if self.kv_source is not None or self.v_proj is not None or self.k_cache is None:
            return False
        self.register_buffer("k_cache", None, persistent=False)
        inv = rope_inv_freq(self.head_dim, *self._rope_args).to(self.v_cache.device)
        self.register_buffer("cache_inv_freq", inv, persistent=False)  # (D/2,) as RotaryEmbedding's
        return True

    def _keys_from_values(self, v_all: Tensor) -> Tensor:
        # v_all (B, H_kv, S, D) -> keys (B, H_kv, S, D), RoPE at positions 0..S-1
        S = v_all.shape[2]
        freqs = torch.arange(S, device=v_all.device).float()[:, None] * self.cache_inv_freq[None, :]  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        if self.v_norm is not None:  # k_norm(raw) = v_norm(raw) * scale
            w = 1.0 + _f32(self.k_norm.weight) if self.k_norm.unit_offset else _f32(self.k_norm.weight)
            k = _cast(_f32(v_all) * w, v_all.dtype)
        else:
            k = self.k_norm(v_all)
        return apply_rope(k, _cast(emb.cos(), v_all.dtype), _cast(emb.sin(), v_all.dtype))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor,
                shared_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H_q, L, D)
        if shared_kv is None:
            k_raw = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
            v = k_raw if self.v_proj is None else self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
            k = apply_rope(self.k_norm(k_raw).transpose(1, 2), cos, sin)  # (B, H_kv, L, D)
            if self.v_norm is not None:
                v = self.v_norm(v)
            v = v.transpose(1, 2)  # (B, H_kv, L, D)
            if self.k_cache is None:  # derive_keys_from_values(): one cache
                self.v_cache.index_copy_(2, input_pos, v)
                k_all, v_all = self._keys_from_values(self.v_cache), self.v_cache
            else:
                self.k_cache.index_copy_(2, input_pos, k)
                self.v_cache.index_copy_(2, input_pos, v)
                k_all, v_all = self.k_cache, self.v_cache  # (B, H_kv, S, D)
        else:
            k_all, v_all = shared_kv
        k, v = k_all, v_all
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:  # repeat_kv: (B, H_kv, S, D) -> (B, H_q, S, D)
            Bc, Hkv, S, D = k.shape
            k = k.unsqueeze(2).expand(Bc, Hkv, n_rep, S, D).reshape(Bc, Hkv * n_rep, S, D)
            v = v.unsqueeze(2).expand(Bc, Hkv, n_rep, S, D).reshape(Bc, Hkv * n_rep, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H_q, L, D)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        return self.o_proj(y), (k_all, v_all)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = _ACT[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k router: scale-free RMSNorm, * scale / sqrt(hidden), softmax, top-k, renormalize."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.top_k, self.root = config.top_k_experts, config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x (T, hidden) -> weights (T, K), indices (T, K)
        probs = F.softmax(self.proj(self.norm(x) * self.scale * self.root), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Expert weights as 3-D tensors; the top-k experts of each token are gathered (gpt-fast)."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.02)  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.02)  # (E, H, I)
        self.act = _ACT[config.hidden_activation]

    def forward(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        # x (T, H), idx/w (T, K) -> (T, H)
        gate, up = torch.einsum("th,tkoh->tko", x, self.gate_up_proj[idx]).chunk(2, dim=-1)
        h = self.act(gate) * up  # (T, K, I)
        out = torch.einsum("tki,tkhi->tkh", h, self.down_proj[idx])  # (T, K, H)
        return (out * _cast(w, out.dtype).unsqueeze(-1)).sum(dim=1)


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma4Config, layer_idx: int, max_batch_size: int, max_seq_len: int):
        super().__init__()
        H, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_unit_offset
        self.self_attn = Attention(config, layer_idx, max_batch_size, max_seq_len)
        wide = config.use_double_wide_mlp and self.self_attn.kv_source is not None
        self.mlp = MLP(H, config.intermediate_size * (2 if wide else 1), config.hidden_activation)
        self.input_layernorm = RMSNorm(H, eps, off)
        self.post_attention_layernorm = RMSNorm(H, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(H, eps, off)
        self.post_feedforward_layernorm = RMSNorm(H, eps, off)
        self.ple_dim = config.hidden_size_per_layer_input
        if self.ple_dim:
            self.act = _ACT[config.hidden_activation]
            self.per_layer_input_gate = nn.Linear(H, self.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(self.ple_dim, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps, off)
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps, off)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps, off)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps, off)
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor,
                per_layer_input: Tensor | None, shared_kv: tuple[Tensor, Tensor] | None):
        # x (B, L, H); per_layer_input (B, L, P) or None
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, shared_kv)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            flat = x.reshape(-1, x.shape[-1])  # (T, H): the router sees the MLP's input residual
            w, idx = self.router(flat)
            h2 = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(x.shape)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(h2)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple_dim:
            g = self.act(self.per_layer_input_gate(x)) * per_layer_input  # (B, L, P)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x, kv


class RotaryEmbedding(nn.Module):
    """Holds ``{layer_type}_inv_freq`` per layer type (non-persistent, as transformers)."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        for t in self.layer_types:
            inv = rope_inv_freq(config.head_dim_for(t), *config.rope_for(t))
            self.register_buffer(f"{t}_inv_freq", inv, persistent=False)

    def forward(self, input_pos: Tensor, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for t in self.layer_types:
            freqs = input_pos.float()[:, None] * getattr(self, f"{t}_inv_freq")[None, :]  # (L, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
            out[t] = (_cast(emb.cos(), dtype), _cast(emb.sin(), dtype))
        return out


class Gemma4TextModel(nn.Module):
    def __init__(self, config: Gemma4Config, max_batch_size: int, max_seq_len: int):
        super().__init__()
        self.config, self.max_seq_len = config, max_seq_len
        H = config.hidden_size
        self.embed_tokens = ScaledEmbedding(config.vocab_size, H, config.pad_token_id, H**0.5)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, max_batch_size, max_seq_len) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(H, config.rms_norm_eps, config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config)
        P = config.hidden_size_per_layer_input
        if P:
            NL = config.num_hidden_layers
            self.embed_tokens_per_layer = ScaledEmbedding(
                config.vocab_size_per_layer_input, NL * P, config.pad_token_id, P**0.5
            )
            self.per_layer_model_projection = nn.Linear(H, NL * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps, config.norm_unit_offset)

    def per_layer_identity(self, ple_tokens: Tensor) -> Tensor:
        """PLE's token-identity part: (B, L) ids -> (B, L, num_layers * P), scaled by sqrt(P)."""
        return self.embed_tokens_per_layer(ple_tokens)

    def per_layer_inputs(self, ple_tokens: Tensor | None, embeds: Tensor, identity: Tensor | None = None) -> Tensor:
        """PLE: (token-identity + context projection) / sqrt(2) -> (B, L, num_layers, P).

        ``identity`` (B, L, num_layers * P): the token-identity part already looked up
        (:meth:`per_layer_identity`; the stock runner's embedding columns), used instead of ``ple_tokens``.
        """
        cfg = self.config
        shape = (*embeds.shape[:2], cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        ident = (self.per_layer_identity(ple_tokens) if identity is None else identity).reshape(shape)
        proj = self.per_layer_model_projection(embeds) * cfg.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.reshape(shape))
        return (proj + ident) * 2.0**-0.5

    def forward(self, tokens: Tensor, input_pos: Tensor, mm_features: Tensor | None = None) -> Tensor:
        cfg = self.config
        embeds = self.embed_tokens(tokens)  # (B, L, H)
        ple_tokens = tokens
        if mm_features is not None:
            mask = tokens == cfg.image_token_id  # (B, L)
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), _cast(mm_features, embeds.dtype))
            if cfg.hidden_size_per_layer_input:
                ple_tokens = tokens.masked_fill(mask, cfg.pad_token_id)
        return self.forward_embeds(embeds, ple_tokens, input_pos)

    def forward_embeds(self, embeds: Tensor, ple_tokens: Tensor | None, input_pos: Tensor,
                       vision_tokens: Tensor | None = None, ple_identity: Tensor | None = None) -> Tensor:
        """Decoder stack on merged embeddings (B, L, H); ``ple_tokens`` (B, L) feed the PLE lookup.

        ``vision_tokens`` (B, L) bool, used when ``use_bidirectional_attention == "vision"``:
        sliding layers also let a query see later keys of its own run of consecutive vision
        tokens in this chunk (transformers' blockwise overlay; full layers stay causal). A run
        must lie inside one prefill chunk for the keys to be in the cache.
        ``ple_identity`` (B, L, num_layers * P): PLE's token-identity part already looked up
        (then ``ple_tokens`` is not read).
        """
        cfg = self.config
        ple = self.per_layer_inputs(ple_tokens, embeds, ple_identity) if cfg.hidden_size_per_layer_input else None

        rope = self.rotary_emb(input_pos, embeds.dtype)  # {type: (cos, sin) each (L, D)}
        k_pos = torch.arange(self.max_seq_len, device=input_pos.device)[None, :]  # (1, S)
        q_pos = input_pos[:, None]  # (L, 1)
        causal = k_pos <= q_pos  # (L, S)
        masks = {FULL: causal[None, None]}  # (1, 1, L, S)
        if SLIDING in rope:
            in_window = q_pos - k_pos < cfg.sliding_window  # (L, S)
            if vision_tokens is not None and cfg.use_bidirectional_attention == "vision":
                run = _same_vision_run(vision_tokens, input_pos, self.max_seq_len)  # (B, 1, L, S)
                masks[SLIDING] = (causal[None, None] | run) & in_window[None, None]
            else:
                masks[SLIDING] = (causal & in_window)[None, None]

        x, kvs = embeds, {}
        for i, layer in enumerate(self.layers):
            t = cfg.layer_types[i]
            src = layer.self_attn.kv_source
            x, kvs[i] = layer(x, *rope[t], input_pos, masks[t],
                              ple[:, :, i, :] if ple is not None else None,
                              kvs[src] if src is not None else None)
        return self.norm(x)


def _same_vision_run(vision_tokens: Tensor, input_pos: Tensor, max_seq_len: int) -> Tensor:
    """(B, 1, L, S) bool: query i and key position s hold tokens of the same vision run of this chunk."""
    L = vision_tokens.shape[1]
    prev = F.pad(vision_tokens, (1, 0), value=False)[:, :L]  # (B, L): previous token is vision
    run = torch.cumsum((vision_tokens & ~prev).long(), dim=1)  # (B, L): 1-based run index
    run = torch.where(vision_tokens, run, 0)  # 0: text
    key_run = run.new_zeros(run.shape[0], max_seq_len).index_copy(1, input_pos, run)  # (B, S)
    return ((run[:, :, None] == key_run[:, None, :]) & (run[:, :, None] > 0))[:, None]


class Gemma4ForCausalLM(nn.Module):
    """Gemma 4 / Gemma 3 causal LM with static KV caches. See the module docstring."""

    def __init__(self, config: Gemma4Config, max_seq_len: int = 2048, max_batch_size: int = 1):
        super().__init__()
        self.config, self.max_seq_len, self.max_batch_size = config, max_seq_len, max_batch_size
        self.model = Gemma4TextModel(config, max_batch_size, max_seq_len)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: Tensor, input_pos: Tensor, mm_features: Tensor | None = None) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != self.max_batch_size:
            raise ValueError(
                f"Gemma4ForCausalLM: tokens must be (max_batch_size={self.max_batch_size}, L), got "
                f"{tuple(tokens.shape)}; build the model with max_batch_size={tokens.shape[0]}."
            )
        if input_pos.shape != (tokens.shape[1],):
            raise ValueError(
                f"Gemma4ForCausalLM: input_pos must be (L,) = ({tokens.shape[1]},), got "
                f"{tuple(input_pos.shape)}."
            )
        logits = self.lm_head(self.model(tokens, input_pos, mm_features))  # (B, L, V)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return _f32(logits)

    def reset_caches(self) -> None:
        """Zero every KV cache buffer (start a new sequence)."""
        for name, buf in self.named_buffers():
            if name.endswith(("k_cache", "v_cache")):
                buf.zero_()


def derive_keys_from_values(model: nn.Module) -> list[str]:
    """Every k_eq_v layer of ``model`` keeps only its V cache (see
    :meth:`Attention.derive_keys_from_values`); returns the attention modules changed."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, Attention) and mod.derive_keys_from_values()]


def cache_buffers(model: nn.Module) -> list[str]:
    """FQNs of all KV cache buffers, in layer order."""
    return [n for n, _ in model.named_buffers() if n.endswith((".k_cache", ".v_cache"))]


def sliding_window_buffers(model: nn.Module) -> dict[str, int]:
    """{cache buffer FQN: window} for the caches of sliding-window layers."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Attention) and mod.is_sliding and mod.kv_source is None:
            out[f"{name}.k_cache"] = mod.sliding_window
            out[f"{name}.v_cache"] = mod.sliding_window
    return out
