"""The Gemma 4 MTP drafter (``gemma-4-*-it-assistant``) as a plain eager model.

Parameter and buffer names are transformers 5.23's ``Gemma4AssistantForCausalLM``
(``transformers/models/gemma4_assistant/``), so its state dict loads as is:

    model.embed_tokens.weight          (V, H)    tied to lm_head.weight
    model.layers.{i}.self_attn.{q_proj, q_norm, o_proj}   (no K / V: every layer reads the target's)
    model.layers.{i}.mlp.{gate_proj, up_proj, down_proj}
    model.layers.{i}.{input, post_attention, pre_feedforward, post_feedforward}_layernorm, layer_scalar
    model.norm.weight
    pre_projection.weight              (H, 2 Hb)  Hb: the target's hidden size (backbone_hidden_size)
    post_projection.weight             (Hb, H)
    lm_head.weight                     (V, H)
    masked_embedding.centroids.weight  (n_centroids, H)   only with use_ordered_embeddings
    masked_embedding.token_ordering    (V,) int64         (buffer)

One draft step (:meth:`Gemma4AssistantForCausalLM.forward`), as transformers'
``SinglePositionMultiTokenCandidateGenerator`` drives it:

    inputs_embeds (B, L, 2 Hb) = cat(target's scaled embedding of the last token,
                                     target's last hidden state (or the previous step's projected state))
    position_ids  (L,) or (B, L)   the position of the last token seen by the target, constant
                                   through a drafting round
    shared_kv     {"sliding_attention": (K, V), "full_attention": (K, V)}: the target's K / V
                  (after norm and RoPE) of its last sliding and last full layer, (B, H_kv, S, D)
    -> logits (B, L, V), projected state (B, L, Hb) (the next step's hidden-state input)

Every layer: pre_projection'd input -> RMSNorm -> attention of its own queries (q_proj, q_norm,
RoPE of its layer type at ``position_ids``) over the shared K / V (scale 1, GQA by repeat) ->
o_proj -> RMSNorm -> residual -> MLP block as Gemma 4 -> ``* layer_scalar``; then ``model.norm``.
No logit softcapping (transformers applies none).

Masks, reproduced from transformers (no padding mask: ``attention_mask=None`` only):

* full attention: every shared entry (bidirectional);
* sliding attention: transformers builds a bidirectional sliding-window mask (``|q - kv| <=
  window``) and flips it on the kv axis, so query ``i`` of the ``L`` sees entry ``j`` of the ``S``
  iff ``|i - (S - 1 - j)| <= window``: the last ``window + 1 + i`` entries for ``i <= window``,
  whatever ``position_ids`` say (a quirk kept for parity; a drafting step has L = 1).

Ordered embeddings (``use_ordered_embeddings``, the centroid "masked embedder"): ``centroids``
scores ``num_centroids`` clusters of ``V / num_centroids`` tokens (``token_ordering`` lists each
cluster's token ids), the top ``centroid_intermediate_top_k`` clusters get exact logits from the
tied head's rows, every other token gets ``min(selected logits) - 1``. It is a shortlist head:
``k * V / n_centroids`` rows of the head instead of ``V`` (E2B: 32 * 128 = 4096 of 262144).

Presets (:data:`ASSISTANT_PRESETS`) give the drafter shapes per Gemma 4 size; see their notes
for which values are published and which are inferred.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FULL, SLIDING, Gemma4Config, from_hf_config
from .model import MLP, RMSNorm, RotaryEmbedding, apply_rope


@dataclass
class Gemma4AssistantConfig:
    """The drafter: a 4-layer Gemma 4 text config (``text``; every layer reads shared K / V) plus
    transformers' ``Gemma4AssistantConfig`` fields."""

    text: Gemma4Config
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        t = self.text
        if t.hidden_size_per_layer_input or t.enable_moe_block or t.use_double_wide_mlp:
            raise ValueError("Gemma4AssistantConfig: the drafter has no per-layer embeddings, MoE block or "
                             "double-wide MLP; set hidden_size_per_layer_input=0, enable_moe_block=False, "
                             "use_double_wide_mlp=False")
        if self.use_ordered_embeddings and t.vocab_size % self.num_centroids:
            raise ValueError(f"Gemma4AssistantConfig: vocab_size {t.vocab_size} is not a multiple of num_centroids "
                             f"{self.num_centroids}; each centroid holds vocab_size / num_centroids tokens")
        if self.use_ordered_embeddings and not 1 <= self.centroid_intermediate_top_k <= self.num_centroids:
            raise ValueError(f"Gemma4AssistantConfig: centroid_intermediate_top_k {self.centroid_intermediate_top_k} "
                             f"must be in [1, num_centroids={self.num_centroids}]")


def from_hf_assistant_config(hf: Any) -> Gemma4AssistantConfig:
    """A transformers ``Gemma4AssistantConfig`` -> :class:`Gemma4AssistantConfig`."""
    text = from_hf_config(_AllShared(hf.get_text_config()))
    text = text.replace(num_kv_shared_layers=0)  # every drafter layer reads the target's K / V: no own caches
    return Gemma4AssistantConfig(text=text, backbone_hidden_size=hf.backbone_hidden_size,
                                 use_ordered_embeddings=hf.use_ordered_embeddings, num_centroids=hf.num_centroids,
                                 centroid_intermediate_top_k=hf.centroid_intermediate_top_k,
                                 tie_word_embeddings=getattr(hf, "tie_word_embeddings", True))


class _AllShared:
    """A text config viewed with ``num_kv_shared_layers = 0`` (transformers' ``kv_sharing_modes``
    raises for a config whose every layer is shared, as the drafter's is)."""

    def __init__(self, cfg: Any):
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        if name == "get_text_config":  # already the text config: from_hf_config must not unwrap it
            raise AttributeError(name)
        return 0 if name == "num_kv_shared_layers" else getattr(self._cfg, name)


# ----------------------------------------------------------------------------- modules


class AssistantAttention(nn.Module):
    """Queries of the drafter's own; keys and values from the target (``shared_kv``)."""

    def __init__(self, config: Gemma4Config, layer_idx: int):
        super().__init__()
        t = config.layer_types[layer_idx]
        self.layer_type, self.is_sliding = t, t == SLIDING
        self.sliding_window = config.sliding_window
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim_for(t)
        self.scale = config.attention_scale
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H_q, L, D)
        k, v = kv  # (B, H_kv, S, D)
        n_rep = self.n_heads // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        mask = None
        if self.is_sliding:  # transformers' flipped bidirectional window (module docstring)
            S = k.shape[2]
            i = torch.arange(L, device=x.device)[:, None]
            j = torch.arange(S, device=x.device)[None, :]
            mask = (i - (S - 1 - j)).abs() <= self.sliding_window  # (L, S)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class AssistantLayer(nn.Module):
    def __init__(self, config: Gemma4Config, layer_idx: int):
        super().__init__()
        h, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_unit_offset
        self.self_attn = AssistantAttention(config, layer_idx)
        self.mlp = MLP(h, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = RMSNorm(h, eps, off)
        self.post_attention_layernorm = RMSNorm(h, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, off)
        self.post_feedforward_layernorm = RMSNorm(h, eps, off)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class AssistantTextModel(nn.Module):
    """``model.*``: the (unused in forward, tied) embedding table, the layers, the final norm."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(AssistantLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, x: Tensor, position_ids: Tensor, shared_kv: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        pos = position_ids.reshape(-1, position_ids.shape[-1])[0]  # (L,): one row of positions for the batch
        rope = self.rotary_emb(pos, x.dtype)
        for layer, t in zip(self.layers, self.config.layer_types):
            x = layer(x, *rope[t], shared_kv[t])
        return self.norm(x)


class MaskedEmbedder(nn.Module):
    """The centroid shortlist head (module docstring): ``(B, L, H) -> (B, L, V)`` logits."""

    def __init__(self, config: Gemma4AssistantConfig):
        super().__init__()
        t = config.text
        self.top_k, self.num_centroids = config.centroid_intermediate_top_k, config.num_centroids
        self.vocab_size, self.per_centroid = t.vocab_size, t.vocab_size // config.num_centroids
        self.centroids = nn.Linear(t.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(t.vocab_size, dtype=torch.long))

    def forward(self, h: Tensor, head_weight: Tensor) -> Tensor:
        B, L, H = h.shape
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # (B, L, k)
        clusters = self.token_ordering.long().view(self.num_centroids, self.per_centroid)
        ids = clusters[top].reshape(B, L, self.top_k * self.per_centroid)  # (B, L, k * V / C)
        rows = head_weight[ids.reshape(-1)].view(B, L, -1, H)  # (B, L, k * V / C, H)
        selected = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)  # (B, L, k * V / C)
        floor = selected.min() - 1.0  # transformers: min over the whole batch, minus 1
        out = floor.to(h.dtype).expand(B, L, self.vocab_size).clone()
        return out.scatter(-1, ids, selected)


class Gemma4AssistantForCausalLM(nn.Module):
    """The MTP drafter; see the module docstring for the step's inputs and outputs."""

    def __init__(self, config: Gemma4AssistantConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.model = AssistantTextModel(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedder(config) if config.use_ordered_embeddings else None

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor,
                shared_kv: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """``(logits (B, L, V), projected state (B, L, backbone_hidden_size))``."""
        missing = sorted({*self.model.config.layer_types} - set(shared_kv))
        if missing:
            raise ValueError(f"Gemma4AssistantForCausalLM: shared_kv has no {missing} entry; pass the target's "
                             f"(K, V) of its last layer of each type: {sorted(set(self.model.config.layer_types))}")
        h = self.model(self.pre_projection(inputs_embeds), position_ids, shared_kv)
        projected = self.post_projection(h)
        if self.masked_embedding is not None:
            return self.masked_embedding(h, self.lm_head.weight), projected
        return self.lm_head(h), projected


# ----------------------------------------------------------------------------- presets


def _drafter_text(**kw: Any) -> Gemma4Config:
    """A 4-layer drafter text config: 3 sliding + 1 full layer, Gemma 4 conventions."""
    base = dict(family="gemma4", vocab_size=262_144, num_hidden_layers=4, layer_types=[SLIDING] * 3 + [FULL],
                hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
                final_logit_softcapping=None, max_position_embeddings=131_072)
    base.update(kw)
    return Gemma4Config(**base)


# Drafter shapes per Gemma 4 size. Published (the targets' configs and the assistant config class
# in transformers 5.23): backbone_hidden_size = the target's hidden size (E2B 1536, E4B 2560,
# 26B-A4B 2816, 31B 5376), 4 layers, the vocabulary (262144), num_centroids 2048 with
# centroid_intermediate_top_k 32 (the config class's defaults, documented for E2B). The drafter's
# attention shapes must match the target's shared K / V (its head dims and KV heads per layer
# type, its sliding window), so they are the target's (fxport's presets). UNCERTAIN (not
# reachable from here: no model hub): the drafters' own hidden_size / intermediate_size (taken as
# the target's hidden size / 4x it would be a guess; here: 256 / 2048 for E2B and E4B, 1024 / 4096
# for 26B-A4B and 31B) and whether use_ordered_embeddings is on (assumed for E2B / E4B, the
# small-vocabulary-head case it is built for, off for the large ones).
def assistant_config_for(tgt: Gemma4Config, hidden_size: int, intermediate_size: int, *, ordered: bool = False,
                         num_centroids: int = 2048, top_k: int = 32) -> Gemma4AssistantConfig:
    """A drafter for target config ``tgt``: its attention shapes (heads, head dims, KV heads per
    layer type, window, RoPE) are the target's, so it reads the target's K / V; its own width is
    ``hidden_size`` / ``intermediate_size``."""
    text = _drafter_text(hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_attention_heads=tgt.num_attention_heads, num_key_value_heads=tgt.num_key_value_heads,
                         head_dim=tgt.head_dim, global_head_dim=tgt.global_head_dim,
                         num_global_key_value_heads=tgt.num_global_key_value_heads,
                         attention_k_eq_v=tgt.attention_k_eq_v, sliding_window=tgt.sliding_window,
                         rope_local_theta=tgt.rope_local_theta, rope_local_partial_factor=tgt.rope_local_partial_factor,
                         rope_local_scaling=tgt.rope_local_scaling, rope_global_theta=tgt.rope_global_theta,
                         rope_global_partial_factor=tgt.rope_global_partial_factor,
                         rope_global_scaling=tgt.rope_global_scaling, rms_norm_eps=tgt.rms_norm_eps,
                         vocab_size=tgt.vocab_size, hidden_activation=tgt.hidden_activation)
    return Gemma4AssistantConfig(text=text, backbone_hidden_size=tgt.hidden_size, use_ordered_embeddings=ordered,
                                 num_centroids=num_centroids, centroid_intermediate_top_k=top_k)


def _preset(target: str, hidden: int, inter: int, ordered: bool) -> Gemma4AssistantConfig:
    from .config import get_preset

    return assistant_config_for(get_preset(target), hidden, inter, ordered=ordered)


ASSISTANT_PRESETS: dict[str, Any] = {
    "e2b": lambda: _preset("e2b", 256, 2048, True),
    "e4b": lambda: _preset("e4b", 256, 2048, True),
    "26b-a4b": lambda: _preset("26b-a4b", 1024, 4096, False),
    "31b": lambda: _preset("31b", 1024, 4096, False),
}


def get_assistant_preset(name: str) -> Gemma4AssistantConfig:
    """The drafter config for Gemma 4 size ``name``; ValueError listing the sizes otherwise."""
    if name not in ASSISTANT_PRESETS:
        raise ValueError(f"unknown Gemma 4 drafter preset {name!r}; valid: {', '.join(ASSISTANT_PRESETS)}")
    return ASSISTANT_PRESETS[name]()


__all__ = ["Gemma4AssistantConfig", "Gemma4AssistantForCausalLM", "from_hf_assistant_config", "get_assistant_preset",
           "assistant_config_for", "ASSISTANT_PRESETS"]
