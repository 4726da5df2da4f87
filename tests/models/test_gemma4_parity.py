"""Parity of fxport's eager Gemma model with transformers 5.23 (the independent reference).

Random tiny configs drawn by hypothesis cover every text feature: sliding/full pattern, GQA,
global head_dim, k_eq_v, q/k/v norms, proportional (partial) RoPE, PLE, KV sharing with
double-wide MLP, layer scalar, final logit softcapping, MoE, tied embeddings, embedding
scaling, attention bias, activation; Gemma 3 adds (1 + w) norms, query_pre_attn_scalar and
linear RoPE scaling. HF weights (norms, scalars and router scales randomized away from their
init) load into ours with a strict ``load_state_dict``.

Tolerance: fp32 logits max-abs diff <= 1e-4 against HF's full-sequence forward (eager
attention), both for our full-sequence forward and for chunked prefill + token-by-token
decode through the KV cache.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma3TextConfig, Gemma4TextConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM as HFGemma3
from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM as HFGemma4

from fxport.models.gemma4.config import PRESETS, Gemma4Config, from_hf_config, get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM, sliding_window_buffers

ATOL = 1e-4  # fp32 logits, max-abs
VOCAB = 96
S, F = "sliding_attention", "full_attention"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every weight away from its init (norm weights and scales away from 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * r if p.dim() == 1 else 0.1 * r)
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _gemma4_hf_config(d: dict) -> Gemma4TextConfig:
    cfg = Gemma4TextConfig(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=len(d["layer_types"]),
        num_attention_heads=4,
        num_key_value_heads=d["kv_heads"],
        head_dim=8,
        global_head_dim=d["global_head_dim"],
        num_global_key_value_heads=d["global_kv_heads"],
        attention_k_eq_v=d["k_eq_v"],
        layer_types=d["layer_types"],
        sliding_window=d["window"],
        final_logit_softcapping=d["softcap"],
        hidden_size_per_layer_input=d["ple"],
        num_kv_shared_layers=d["kv_shared"],
        use_double_wide_mlp=d["double_wide"],
        enable_moe_block=d["moe"],
        num_experts=4 if d["moe"] else None,
        top_k_experts=2 if d["moe"] else None,
        moe_intermediate_size=8 if d["moe"] else None,
        attention_bias=d["bias"],
        hidden_activation=d["act"],
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": d["local_theta"]},
            F: {"rope_type": "proportional", "partial_rotary_factor": d["partial"],
                "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return cfg


@st.composite
def gemma4_knobs(draw) -> dict:
    n_layers = draw(st.integers(2, 6))
    types = draw(st.lists(st.sampled_from([S, F]), min_size=n_layers - 1, max_size=n_layers - 1))
    types = types + [F]  # transformers forces the last layer to full attention
    # KV sharing needs every shared layer type produced earlier.
    max_shared = 0
    for k in range(1, n_layers):
        if set(types[n_layers - k:]) <= set(types[: n_layers - k]):
            max_shared = k
    return dict(
        layer_types=types,
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        global_kv_heads=draw(st.sampled_from([1, 2, 4])),
        global_head_dim=draw(st.sampled_from([8, 16])),
        k_eq_v=draw(st.booleans()),
        window=draw(st.integers(1, 6)),
        softcap=draw(st.sampled_from([None, 30.0, 3.0])),
        ple=draw(st.sampled_from([0, 4])),
        kv_shared=draw(st.integers(0, max_shared)),
        double_wide=draw(st.booleans()),
        moe=draw(st.booleans()),
        bias=draw(st.booleans()),
        act=draw(st.sampled_from(["gelu_pytorch_tanh", "silu"])),
        partial=draw(st.sampled_from([0.25, 0.5, 1.0])),
        local_theta=draw(st.sampled_from([10_000.0, 100.0])),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def gemma3_knobs(draw) -> dict:
    n_layers = draw(st.integers(2, 6))
    return dict(
        n_layers=n_layers,
        pattern=draw(st.integers(1, 4)),  # sliding_window_pattern: every k-th layer is full
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        window=draw(st.integers(1, 6)),
        qpas=draw(st.sampled_from([8, 64])),
        softcap=draw(st.sampled_from([None, 3.0])),
        linear_factor=draw(st.sampled_from([None, 8.0])),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


def _gemma3_hf_config(d: dict) -> Gemma3TextConfig:
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=d["n_layers"],
        num_attention_heads=4,
        num_key_value_heads=d["kv_heads"],
        head_dim=8,
        sliding_window=d["window"],
        sliding_window_pattern=d["pattern"],
        query_pre_attn_scalar=d["qpas"],
        final_logit_softcapping=d["softcap"],
        rope_scaling=({"rope_type": "linear", "factor": d["linear_factor"]}
                      if d["linear_factor"] else None),
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _pair(hf_cls, hf_cfg, seed: int, max_seq_len: int, batch: int):
    torch.manual_seed(seed)
    hf = hf_cls(hf_cfg).eval()
    _randomize(hf, seed)
    ours = Gemma4ForCausalLM(from_hf_config(hf_cfg), max_seq_len=max_seq_len, max_batch_size=batch).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _check_full_and_cached(hf, ours, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    L = 11
    tokens = torch.randint(1, VOCAB, (batch, L), generator=g)
    with torch.no_grad():
        # output_hidden_states=True keeps transformers off its KV-shared-layer slicing
        # shortcut, which crashes when KV sharing is used without PLE (a transformers bug).
        ref = hf(tokens, output_hidden_states=True).logits  # (B, L, V)
        full = ours(tokens, torch.arange(L))
        assert full.dtype == torch.float32 and full.shape == ref.shape
        assert (full - ref).abs().max().item() <= ATOL

        # chunked prefill, then token-by-token decode, through the cache
        ours.reset_caches()
        first = int(torch.randint(1, 6, (1,), generator=g))
        outs = [ours(tokens[:, :first], torch.arange(first))]
        pos = first
        if pos < 7:  # a second prefill chunk
            outs.append(ours(tokens[:, pos:7], torch.arange(pos, 7)))
            pos = 7
        for p in range(pos, L):
            outs.append(ours(tokens[:, p:p + 1], torch.tensor([p])))
        cached = torch.cat(outs, dim=1)
    assert (cached - ref).abs().max().item() <= ATOL


@settings(max_examples=12, deadline=None)
@given(d=gemma4_knobs())
def test_gemma4_matches_transformers(d):
    hf, ours = _pair(HFGemma4, _gemma4_hf_config(d), d["seed"], 16, d["batch"])
    _check_full_and_cached(hf, ours, d["batch"], d["seed"])


@settings(max_examples=8, deadline=None)
@given(d=gemma3_knobs())
def test_gemma3_matches_transformers(d):
    hf, ours = _pair(HFGemma3, _gemma3_hf_config(d), d["seed"], 16, d["batch"])
    _check_full_and_cached(hf, ours, d["batch"], d["seed"])


ALL_ON = dict(
    layer_types=[S, S, F, S, F, S, F], kv_heads=2, global_kv_heads=1, global_head_dim=16,
    k_eq_v=True, window=3, softcap=30.0, ple=4, kv_shared=3, double_wide=True, moe=True,
    bias=False, act="gelu_pytorch_tanh", partial=0.25, local_theta=10_000.0, batch=1, seed=7,
)


def test_gemma4_all_features_at_once():
    """One config with every Gemma 4 feature on, so no feature depends on hypothesis' luck."""
    hf_cfg = _gemma4_hf_config(ALL_ON)
    hf, ours = _pair(HFGemma4, hf_cfg, 7, 16, 1)
    cfg = ours.config
    # layers 4..6 are KV-shared: each reads the last earlier layer of its type
    assert [cfg.kv_source(i) for i in range(7)] == [None, None, None, None, 2, 3, 2]
    assert cfg.kv_heads_for(F) == 1 and cfg.head_dim_for(F) == 16
    assert ours.model.layers[5].mlp.gate_proj.out_features == 96  # double-wide shared layer
    assert ours.model.layers[3].mlp.gate_proj.out_features == 48
    assert ours.model.layers[2].self_attn.v_proj is None  # k_eq_v full layer
    assert not hasattr(ours.model.layers[4].self_attn, "k_proj")  # shared: no K/V weights
    _check_full_and_cached(hf, ours, 1, 7)


def test_tied_embedding_and_cache_layout():
    cfg = get_preset("tiny")
    m = Gemma4ForCausalLM(cfg, max_seq_len=32, max_batch_size=2)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    bufs = dict(m.named_buffers())
    # layer 2 is full (head_dim 32, 1 global kv head); layers 4, 5 are KV-shared (no cache)
    assert bufs["model.layers.0.self_attn.k_cache"].shape == (2, 2, 32, 16)
    assert bufs["model.layers.2.self_attn.v_cache"].shape == (2, 1, 32, 32)
    assert "model.layers.4.self_attn.k_cache" not in bufs
    assert "model.layers.5.self_attn.k_cache" not in bufs
    assert sliding_window_buffers(m) == {
        f"model.layers.{i}.self_attn.{kv}_cache": 4 for i in (0, 1, 3) for kv in "kv"
    }


# ---- multimodal merge -------------------------------------------------------------------

def _multimodal_models(hf_model_cls, hf_cfg, img: int, seed: int):
    """(HF multimodal model with eager attention and randomized weights, our model built from
    its config with max_seq_len 16); checks the image token id is carried over."""
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = hf_model_cls(hf_cfg).eval()
    _randomize(hf, seed)
    cfg = from_hf_config(hf_cfg)
    assert cfg.image_token_id == img
    return hf, Gemma4ForCausalLM(cfg, max_seq_len=16).eval()


def _assert_merge_parity(hf, ours, tokens: torch.Tensor, feats: torch.Tensor, image_output) -> None:
    """Our model's last hidden state == HF's for ``tokens`` with image features merged."""
    with torch.no_grad():
        ref = hf(input_ids=tokens, mm_encoder_outputs={"image": image_output}).last_hidden_state
        ours_h = ours.model(tokens, torch.arange(tokens.shape[1]), feats)
    assert (ours_h - ref).abs().max().item() <= ATOL


def test_gemma4_multimodal_merge_matches_transformers():
    """Our masked_scatter merge (and pad-id PLE at placeholders) == HF Gemma4Model's."""
    from transformers import Gemma4Config as HFGemma4Config
    from transformers.models.gemma4.modeling_gemma4 import Gemma4Model

    img = VOCAB - 1
    text_cfg = _gemma4_hf_config(ALL_ON)
    hf_cfg = HFGemma4Config(text_config=text_cfg, vision_config=None, audio_config=None,
                            image_token_id=img)
    hf, ours = _multimodal_models(Gemma4Model, hf_cfg, img, 3)
    sd = {k.removeprefix("language_model."): v for k, v in hf.state_dict().items()}
    ours.model.load_state_dict(sd, strict=True)

    tokens = torch.tensor([[2, 5, img, img, img, 9, 11, img, 4, 3]])
    feats = torch.randn(4, 32)
    _assert_merge_parity(hf, ours, tokens, feats, BaseModelOutputWithPooling(pooler_output=[feats[:3], feats[3:]]))


def test_gemma3_multimodal_merge_matches_transformers():
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import SiglipVisionConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Model

    img = VOCAB - 1
    text_cfg = _gemma3_hf_config(dict(n_layers=3, pattern=3, kv_heads=2, window=3, qpas=8,
                                      softcap=None, linear_factor=None))
    vis = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=16, patch_size=4)
    hf_cfg = HFGemma3Config(text_config=text_cfg, vision_config=vis, image_token_id=img,
                            mm_tokens_per_image=4)
    hf, ours = _multimodal_models(Gemma3Model, hf_cfg, img, 4)
    sd = {k.removeprefix("language_model."): v for k, v in hf.state_dict().items()
          if k.startswith("language_model.")}
    ours.model.load_state_dict(sd, strict=True)

    tokens = torch.tensor([[2, 7, img, img, img, img, 8, 9]])
    feats = torch.randn(4, 32)
    _assert_merge_parity(hf, ours, tokens, feats,
                         BaseModelOutputWithPooling(pooler_output=feats[None]))  # (images, tokens, hidden)


# ---- config -----------------------------------------------------------------------------

def test_unknown_preset_error_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_preset("gemma-5")
    assert str(e.value) == (
        "unknown Gemma preset 'gemma-5'; valid presets: " + ", ".join(sorted(PRESETS))
    )


def test_presets_present_and_fresh_copies():
    assert {"e2b", "e4b", "26b-a4b", "31b", "gemma3-270m", "tiny", "tiny-gemma3"} <= set(PRESETS)
    a = get_preset("31b")
    a.layer_types[0] = F
    assert PRESETS["31b"].layer_types[0] == S


def test_gemma3_270m_preset_equals_transformers_config():
    """The published Gemma 3 270M numbers, through transformers' own defaults."""
    hf = Gemma3TextConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                          num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
                          max_position_embeddings=32_768)
    assert from_hf_config(hf) == get_preset("gemma3-270m")


@pytest.mark.parametrize("name", ["e2b", "e4b", "26b-a4b", "31b"])
def test_gemma4_presets_round_trip_through_transformers(name):
    """Each Gemma 4 preset is expressible as a transformers config and converts back equal."""
    p = get_preset(name)
    hf = Gemma4TextConfig(
        vocab_size=p.vocab_size, vocab_size_per_layer_input=p.vocab_size_per_layer_input,
        hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, head_dim=p.head_dim,
        global_head_dim=p.global_head_dim, num_global_key_value_heads=p.num_global_key_value_heads,
        attention_k_eq_v=p.attention_k_eq_v, layer_types=p.layer_types,
        sliding_window=p.sliding_window, final_logit_softcapping=p.final_logit_softcapping,
        hidden_size_per_layer_input=p.hidden_size_per_layer_input,
        num_kv_shared_layers=p.num_kv_shared_layers, use_double_wide_mlp=p.use_double_wide_mlp,
        enable_moe_block=p.enable_moe_block, num_experts=p.num_experts or None,
        top_k_experts=p.top_k_experts or None, moe_intermediate_size=p.moe_intermediate_size or None,
        max_position_embeddings=p.max_position_embeddings, eos_token_id=p.eos_token_id,
        use_bidirectional_attention=p.use_bidirectional_attention,
    )  # rope: transformers' Gemma 4 defaults
    got = from_hf_config(hf)
    if not p.attention_k_eq_v:  # transformers ignores num_global_key_value_heads then
        p = p.replace(num_global_key_value_heads=got.num_global_key_value_heads)
    assert got == p


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers=3"):
        Gemma4Config(num_hidden_layers=3, layer_types=[S, F])
    with pytest.raises(ValueError, match="KV-shared layers of type"):
        Gemma4Config(num_hidden_layers=3, layer_types=[S, S, F], num_kv_shared_layers=1)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        Gemma4Config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        hf = Gemma3TextConfig(num_hidden_layers=2, rope_scaling={"rope_type": "yarn", "factor": 2.0})
        from_hf_config(hf)


def test_bad_inputs_raise_clear_errors():
    m = Gemma4ForCausalLM(get_preset("tiny-gemma3"), max_seq_len=8, max_batch_size=1)
    with pytest.raises(ValueError, match=r"tokens must be \(max_batch_size=1, L\), got \(2, 3\)"):
        m(torch.zeros(2, 3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match=r"input_pos must be \(L,\) = \(3,\), got \(2,\)"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.arange(2))
