"""Recipes: ordered regex rules, layer filters (negative = from the end), printing, Gemma 4 recipes."""

import pytest

from fxport.quant.recipe import (
    DEFAULT_RECIPE,
    INT4_G32,
    INT4_G32_HQQ,
    INT8_G32,
    INT8_PER_CHANNEL,
    SENSITIVE_RECIPE,
    QuantConfig,
    QuantRecipe,
    QuantRule,
    get_recipe,
)

L = "model.layers.{}.{}.weight"


def test_default_recipe_gemma_names():
    r = DEFAULT_RECIPE
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert r.config_for(L.format(5, proj)) == INT4_G32
    assert r.config_for("model.embed_tokens.weight") == INT8_PER_CHANNEL
    assert r.config_for("model.layers.0.input_layernorm.weight") is None
    assert r.config_for("model.layers.0.self_attn.q_norm.weight") is None


def test_sensitive_recipe_edge_layers_stay_8bit():
    r = SENSITIVE_RECIPE
    got = {i: r.config_for(L.format(i, "self_attn.v_proj"), num_layers=18) for i in range(18)}
    assert [i for i, c in got.items() if c == INT8_G32] == [0, 1, 16, 17]
    assert all(c == INT4_G32_HQQ for i, c in got.items() if i not in (0, 1, 16, 17))
    assert r.config_for(L.format(1, "self_attn.q_proj"), num_layers=18) == INT4_G32_HQQ
    assert r.config_for(L.format(17, "mlp.down_proj"), num_layers=18) == INT8_G32


def test_first_match_wins_and_negative_layers_need_num_layers():
    r = QuantRecipe("t", (QuantRule(r".*q_proj\.weight", None, layers=(-1,)), QuantRule(r".*proj\.weight", INT4_G32)))
    assert r.config_for(L.format(3, "q_proj"), num_layers=4) is None
    assert r.config_for(L.format(2, "q_proj"), num_layers=4) == INT4_G32
    assert r.config_for("lm_head.proj.weight", num_layers=4) == INT4_G32  # no layer index: filter fails
    with pytest.raises(ValueError, match="negative layer -1 needs num_layers"):
        r.config_for(L.format(3, "q_proj"))


def test_printable():
    text = str(SENSITIVE_RECIPE)
    assert text.splitlines()[0] == "QuantRecipe 'sensitive' (first match wins; unmatched weights stay float)"
    assert "-> int8 g32 minmax sym  layers=[0, 1, -2, -1]" in text
    assert "-> int4 g32 hqq" in text and "-> int8 per-channel minmax sym" in text


def test_registry_and_config_validation():
    assert get_recipe("default") is DEFAULT_RECIPE
    with pytest.raises(ValueError, match=r"unknown quantization recipe 'x'; known: \['default', 'sensitive'\]"):
        get_recipe("x")
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        QuantConfig(bits=3)
