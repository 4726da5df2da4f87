"""Configuration of the Gemma 4 text model (Gemma 3 text is a config of the same model).

One dataclass, :class:`Gemma4Config`, holds every knob of the text decoder; ``PRESETS`` maps
names to configs; :func:`get_preset` looks one up; :func:`from_hf_config` converts a
transformers ``Gemma4TextConfig`` or ``Gemma3TextConfig``.

Gemma 3 differs from Gemma 4 only by flags (all checked by the parity tests):
  * ``norm_unit_offset=True``: RMSNorm scales by ``1 + weight`` (Gemma 4: ``weight``);
  * ``query_pre_attn_scalar=256``: attention scale ``256 ** -0.5`` (Gemma 4: ``None`` -> 1.0);
  * ``use_v_norm=False``, ``use_layer_scalar=False``;
  * no global head dim / k_eq_v / PLE / KV sharing / MoE (their defaults switch them off).

Per layer type (``layer_types[i]`` in {"sliding_attention", "full_attention"}):
  * sliding layers: ``head_dim``, ``num_key_value_heads``, RoPE ``rope_local_*``;
  * full layers: ``global_head_dim``, ``num_global_key_value_heads`` (only when
    ``attention_k_eq_v``, as transformers does), RoPE ``rope_global_*``, and V = K projection
    when ``attention_k_eq_v``.

RoPE: ``inv_freq[j] = 1 / theta ** (2j / head_dim) / scaling`` for ``j < int(partial *
head_dim // 2)`` and 0 beyond (no rotation). With ``partial=1`` this is the default RoPE,
with ``scaling`` it is transformers' "linear" RoPE, with ``partial<1`` it is transformers'
"proportional" RoPE (the rotated pairs stay (j, j + head_dim/2), as in rotate_half).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


def pattern_layer_types(num_layers: int, period: int) -> list[str]:
    """``period - 1`` sliding layers then one full layer, repeated (transformers' default)."""
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]


@dataclass
class Gemma4Config:
    """Every knob of the Gemma 4 / Gemma 3 text decoder. Defaults: a small Gemma-4-like model."""

    family: str = "gemma4"  # informational: "gemma4" or "gemma3"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    # Full-attention layers. None -> head_dim / num_key_value_heads.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None  # used only when attention_k_eq_v
    attention_k_eq_v: bool = False  # full layers: no v_proj, V = raw K projection
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # Gemma 3: x_normed * (1 + w); Gemma 4: x_normed * w
    query_pre_attn_scalar: float | None = None  # attention scale = qpas ** -0.5; None -> 1.0
    use_v_norm: bool = True  # scale-free RMSNorm on V (Gemma 4)
    use_layer_scalar: bool = True  # per-layer `layer_scalar` buffer multiplying the output
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)  # empty -> 5 sliding : 1 full
    # RoPE per layer type (see module docstring).
    rope_local_theta: float = 10_000.0
    rope_local_partial_factor: float = 1.0
    rope_local_scaling: float = 1.0
    rope_global_theta: float = 1_000_000.0
    rope_global_partial_factor: float = 0.25
    rope_global_scaling: float = 1.0
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    # Per-layer embeddings (PLE); 0 disables.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 262_144
    # KV sharing: the last `num_kv_shared_layers` layers reuse the cache of the last earlier
    # layer of the same type; `use_double_wide_mlp` doubles their MLP width.
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Mixture of experts (added to the dense MLP in every layer, as in 26B-A4B).
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # Tokens.
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    image_token_id: int = 258_880
    # Other multimodal placeholders (from the top-level transformers config); None: absent.
    audio_token_id: int | None = None
    video_token_id: int | None = None
    max_position_embeddings: int = 131_072
    # "vision": sliding layers attend both ways inside each run of image/video tokens when the
    # caller passes the vision-token mask (the multimodal model does; Gemma4ForCausalLM is
    # causal, as transformers is without mm_token_type_ids). Full layers are always causal.
    use_bidirectional_attention: str | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = pattern_layer_types(self.num_hidden_layers, 6)
        self.layer_types = list(self.layer_types)
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the bad knob and the fix."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"Gemma4Config: layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers={self.num_hidden_layers}; give one type per layer."
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ValueError(
                f"Gemma4Config: unknown layer types {bad}; use {SLIDING!r} or {FULL!r}."
            )
        for name, heads in (
            ("num_key_value_heads", self.num_key_value_heads),
            ("full-layer kv heads", self.kv_heads_for(FULL)),
        ):
            if heads <= 0 or self.num_attention_heads % heads:
                raise ValueError(
                    f"Gemma4Config: num_attention_heads={self.num_attention_heads} is not a "
                    f"multiple of {name}={heads}."
                )
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ValueError(
                f"Gemma4Config: num_kv_shared_layers={self.num_kv_shared_layers} must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers})."
            )
        if self.num_kv_shared_layers:
            first = self.num_hidden_layers - self.num_kv_shared_layers
            missing = set(self.layer_types[first:]) - set(self.layer_types[:first])
            if missing:
                raise ValueError(
                    f"Gemma4Config: KV-shared layers of type {sorted(missing)} have no earlier "
                    f"layer of that type to read the cache from; lower num_kv_shared_layers."
                )
        if self.enable_moe_block and not (
            self.num_experts > 0 and 0 < self.top_k_experts <= self.num_experts
            and self.moe_intermediate_size > 0
        ):
            raise ValueError(
                "Gemma4Config: enable_moe_block needs num_experts > 0, 0 < top_k_experts <= "
                f"num_experts and moe_intermediate_size > 0 (got {self.num_experts}, "
                f"{self.top_k_experts}, {self.moe_intermediate_size})."
            )
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ValueError(
                f"Gemma4Config: use_bidirectional_attention={self.use_bidirectional_attention!r}"
                " is not supported (only causal attention); use None."
            )
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(
                f"Gemma4Config: hidden_activation={self.hidden_activation!r} unknown; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )

    # ---- derived per-layer quantities -------------------------------------------------
    def head_dim_for(self, layer_type: str) -> int:
        if layer_type == FULL and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def kv_heads_for(self, layer_type: str) -> int:
        if layer_type == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def rope_for(self, layer_type: str) -> tuple[float, float, float]:
        """(theta, partial_factor, scaling) of a layer type."""
        if layer_type == FULL:
            return self.rope_global_theta, self.rope_global_partial_factor, self.rope_global_scaling
        return self.rope_local_theta, self.rope_local_partial_factor, self.rope_local_scaling

    @property
    def attention_scale(self) -> float:
        return 1.0 if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer_idx: int) -> int | None:
        """Index of the layer whose cache layer ``layer_idx`` reads, or None if it owns one.

        As transformers: a KV-shared layer reads the last non-shared layer of its type.
        """
        first = self.first_kv_shared_layer
        if layer_idx < first:
            return None
        t = self.layer_types[layer_idx]
        return max(i for i in range(first) if self.layer_types[i] == t)

    def replace(self, **changes: Any) -> "Gemma4Config":
        return dataclasses.replace(self, **changes)


_ACTIVATIONS = {"gelu_pytorch_tanh", "gelu", "silu", "relu"}


# ---- presets ---------------------------------------------------------------------------
# Published Gemma 4 text configs as far as they can be pinned down from transformers 5.23
# (configuration_gemma4.py defaults: global_head_dim 512, proportional RoPE 0.25 / 1e6 for
# full layers, default RoPE 1e4 for sliding layers) plus the published config.json files
# (E2B / E4B as mirrored in ExecuTorch's examples/models/gemma4/config, 26B-A4B and 31B as
# quoted in ExecuTorch's gemma4_31b model and several public parsers). Uncertain values are
# marked "# uncertain".

_GEMMA4_COMMON: dict[str, Any] = dict(
    family="gemma4",
    vocab_size=262_144,
    vocab_size_per_layer_input=262_144,
    head_dim=256,
    global_head_dim=512,
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    rope_local_theta=10_000.0,
    rope_global_theta=1_000_000.0,
    rope_global_partial_factor=0.25,
    image_token_id=258_880,
    eos_token_id=[1, 106],  # uncertain: <eos> and <end_of_turn> as in Gemma 3 IT
)

PRESETS: dict[str, Gemma4Config] = {
    "e2b": Gemma4Config(
        **_GEMMA4_COMMON,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        layer_types=pattern_layer_types(35, 5),  # 4 sliding : 1 full
        sliding_window=512,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        max_position_embeddings=131_072,
    ),
    "e4b": Gemma4Config(
        **_GEMMA4_COMMON,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        layer_types=pattern_layer_types(42, 6),
        sliding_window=512,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        max_position_embeddings=131_072,
    ),
    "26b-a4b": Gemma4Config(
        **_GEMMA4_COMMON,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        layer_types=pattern_layer_types(30, 6),
        sliding_window=1024,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        max_position_embeddings=262_144,
        use_bidirectional_attention="vision",  # uncertain
    ),
    "31b": Gemma4Config(
        **_GEMMA4_COMMON,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        layer_types=pattern_layer_types(60, 6),
        sliding_window=1024,
        max_position_embeddings=262_144,
        use_bidirectional_attention="vision",  # uncertain
    ),
    # The real Gemma 3 270M (google/gemma-3-270m).
    "gemma3-270m": Gemma4Config(
        family="gemma3",
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        norm_unit_offset=True,
        query_pre_attn_scalar=256,
        use_v_norm=False,
        use_layer_scalar=False,
        sliding_window=512,
        layer_types=pattern_layer_types(18, 6),
        rope_local_theta=10_000.0,
        rope_global_theta=1_000_000.0,
        rope_global_partial_factor=1.0,
        final_logit_softcapping=None,
        image_token_id=262_144,  # Gemma 3's image token (out of this text-only vocab)
        max_position_embeddings=32_768,
    ),
    # Tiny test configs: every Gemma 4 feature on except MoE (see "tiny-moe").
    "tiny": Gemma4Config(
        family="gemma4",
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
        sliding_window=4,
        rope_global_partial_factor=0.25,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        image_token_id=255,
        max_position_embeddings=512,
    ),
    "tiny-gemma3": Gemma4Config(
        family="gemma3",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        norm_unit_offset=True,
        query_pre_attn_scalar=16,
        use_v_norm=False,
        use_layer_scalar=False,
        sliding_window=4,
        layer_types=pattern_layer_types(6, 3),
        rope_global_partial_factor=1.0,
        final_logit_softcapping=None,
        image_token_id=255,
        max_position_embeddings=512,
    ),
}

# 26B-A4B-like: "tiny" without PLE and KV sharing, plus the MoE block (dense MLP + 4 experts, top-2).
PRESETS["tiny-moe"] = dataclasses.replace(
    PRESETS["tiny"],
    layer_types=list(PRESETS["tiny"].layer_types),
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
)


def get_preset(name: str) -> Gemma4Config:
    """A fresh copy of preset ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown Gemma preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        )
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, layer_types=list(cfg.layer_types))


# ---- transformers conversion -------------------------------------------------------------
def _rope(params: dict | None, layer_type: str) -> tuple[float, float, float]:
    """(theta, partial, scaling) from a transformers rope_parameters entry."""
    p = dict(params or {})
    rope_type = p.get("rope_type", "default")
    theta = float(p.get("rope_theta", 10_000.0 if layer_type == SLIDING else 1_000_000.0))
    if rope_type == "default":
        return theta, 1.0, 1.0  # transformers' default RoPE ignores partial_rotary_factor
    if rope_type == "linear":
        return theta, 1.0, float(p.get("factor", 1.0))
    if rope_type == "proportional":
        return theta, float(p.get("partial_rotary_factor", 1.0)), float(p.get("factor", 1.0))
    raise ValueError(
        f"from_hf_config: rope_type {rope_type!r} for {layer_type} layers is not supported; "
        "supported: default, linear, proportional."
    )


def from_hf_config(hf_config: Any) -> Gemma4Config:
    """Convert a transformers Gemma4TextConfig / Gemma3TextConfig (or a config holding one).

    Raises ValueError for features the eager model does not implement (attention logit
    softcapping, bidirectional text attention, unsupported RoPE types).
    """
    image_token_id = getattr(hf_config, "image_token_id", None)  # top-level multimodal config
    mm_ids = {k: getattr(hf_config, k, None) for k in ("audio_token_id", "video_token_id")}
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    model_type = getattr(hf_config, "model_type", "")
    layer_types = list(hf_config.layer_types)
    rope = hf_config.rope_parameters or {}
    local = _rope(rope.get(SLIDING), SLIDING)
    glob = _rope(rope.get(FULL), FULL)
    common = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        hidden_activation=hf_config.hidden_activation,
        rms_norm_eps=hf_config.rms_norm_eps,
        attention_bias=bool(hf_config.attention_bias),
        sliding_window=hf_config.sliding_window,
        layer_types=layer_types,
        rope_local_theta=local[0],
        rope_local_partial_factor=local[1],
        rope_local_scaling=local[2],
        rope_global_theta=glob[0],
        rope_global_partial_factor=glob[1],
        rope_global_scaling=glob[2],
        final_logit_softcapping=hf_config.final_logit_softcapping,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        bos_token_id=hf_config.bos_token_id if hf_config.bos_token_id is not None else 2,
        eos_token_id=hf_config.eos_token_id if hf_config.eos_token_id is not None else 1,
        max_position_embeddings=hf_config.max_position_embeddings,
    )
    if model_type.startswith("gemma4"):
        # head_dim / kv heads are per-layer attributes in transformers' Gemma 4 config.
        per_layer = hf_config.per_layer_config
        sliding_idx = [i for i, t in enumerate(layer_types) if t == SLIDING]
        full_idx = [i for i, t in enumerate(layer_types) if t == FULL]
        ref = per_layer[sliding_idx[0] if sliding_idx else 0]
        head_dim, kv_heads = ref.head_dim, ref.num_key_value_heads
        g = per_layer[full_idx[0]] if full_idx else ref
        if hf_config.use_bidirectional_attention == "all":
            raise ValueError(
                "from_hf_config: use_bidirectional_attention='all' is not supported "
                "(the eager model is causal)."
            )
        return Gemma4Config(
            family="gemma4",
            intermediate_size=hf_config.intermediate_size,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            global_head_dim=g.head_dim,
            num_global_key_value_heads=g.num_key_value_heads,
            attention_k_eq_v=bool(hf_config.attention_k_eq_v),
            norm_unit_offset=False,
            query_pre_attn_scalar=None,
            use_v_norm=True,
            use_layer_scalar=True,
            hidden_size_per_layer_input=hf_config.hidden_size_per_layer_input or 0,
            vocab_size_per_layer_input=hf_config.vocab_size_per_layer_input,
            num_kv_shared_layers=hf_config.num_kv_shared_layers,
            use_double_wide_mlp=bool(hf_config.use_double_wide_mlp),
            enable_moe_block=bool(hf_config.enable_moe_block),
            num_experts=hf_config.num_experts or 0,
            top_k_experts=hf_config.top_k_experts or 0,
            moe_intermediate_size=hf_config.moe_intermediate_size or 0,
            use_bidirectional_attention=hf_config.use_bidirectional_attention,
            image_token_id=258_880 if image_token_id is None else image_token_id,
            **mm_ids,
            **common,
        )
    if model_type.startswith("gemma3"):
        if getattr(hf_config, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                "from_hf_config: attn_logit_softcapping is not supported (SDPA has no "
                "softcap); use a config with attn_logit_softcapping=None."
            )
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError(
                "from_hf_config: use_bidirectional_attention=True is not supported "
                "(the eager model is causal)."
            )
        return Gemma4Config(
            family="gemma3",
            intermediate_size=hf_config.intermediate_size,
            num_key_value_heads=hf_config.num_key_value_heads,
            head_dim=hf_config.head_dim,
            global_head_dim=None,
            num_global_key_value_heads=None,
            attention_k_eq_v=False,
            norm_unit_offset=True,
            query_pre_attn_scalar=hf_config.query_pre_attn_scalar,
            use_v_norm=False,
            use_layer_scalar=False,
            hidden_size_per_layer_input=0,
            image_token_id=262_144 if image_token_id is None else image_token_id,
            **common,
        )
    raise ValueError(
        f"from_hf_config: unsupported model_type {model_type!r}; expected a gemma4_text or "
        "gemma3_text config."
    )
