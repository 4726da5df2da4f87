"""fxport's Gemma 4 MTP drafter (models/gemma4/assistant.py) against transformers 5.23's
``Gemma4AssistantForCausalLM`` on random tiny configs, with and without ordered (centroid)
embeddings: the same state dict (names and shapes), logits and projected state within 1e-4 given
the same target states (inputs_embeds, position ids, shared K / V), for the drafting step
(L = 1, transformers' sdpa attention) and L = 3 (its flipped sliding mask; against its eager
attention, as its sdpa path runs unmasked full-attention layers with is_causal=True when L > 1).

transformers quirks handled here (DESIGN.md): ``Gemma4TextConfig.kv_sharing_modes`` raises when
every layer is KV-shared (patched to "reuse" for every layer while the reference is built and
run); L > 1 needs ``output_hidden_states=True`` under sdpa; ``token_ordering`` initialises to
zeros (set to a random permutation, so every cluster is distinct).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig as _TextConfig  # noqa: E402
from transformers.models.gemma4_assistant import (  # noqa: E402
    Gemma4AssistantConfig as HFConfig,
)
from transformers.models.gemma4_assistant import (  # noqa: E402
    Gemma4AssistantForCausalLM as HFAssistant,
)

from fxport.models.gemma4.assistant import (  # noqa: E402
    ASSISTANT_PRESETS,
    Gemma4AssistantForCausalLM,
    from_hf_assistant_config,
    get_assistant_preset,
)

V, H, HB = 64, 32, 48


@pytest.fixture
def all_shared(monkeypatch):
    monkeypatch.setattr(_TextConfig, "kv_sharing_modes", property(lambda self: ["reuse"] * self.num_hidden_layers))


def hf_assistant(ordered: bool, seed: int, attn: str = "sdpa") -> HFAssistant:
    text = Gemma4TextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=3, layer_types=["sliding_attention"] * 3 + ["full_attention"], hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, num_kv_shared_layers=4, enable_moe_block=False, use_double_wide_mlp=False)
    cfg = HFConfig(text_config=text, backbone_hidden_size=HB, use_ordered_embeddings=ordered, num_centroids=8,
                   centroid_intermediate_top_k=2)
    cfg.text_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = HFAssistant(cfg).eval()
    with torch.no_grad():  # norms, layer scalars and the ordering away from their initial values
        for name, t in model.named_parameters():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
            if name.endswith("token_ordering"):
                b.copy_(torch.randperm(V))
    return model


def target_states(L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    kv = {"sliding_attention": (torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)),
          "full_attention": (torch.randn(1, 1, 9, 16, generator=g), torch.randn(1, 1, 9, 16, generator=g))}
    return torch.randn(1, L, 2 * HB, generator=g), torch.arange(7, 7 + L)[None], kv


@pytest.mark.parametrize("ordered", [False, True], ids=["plain-head", "ordered-embeddings"])
@pytest.mark.parametrize("L", [1, 3])
def test_drafter_matches_transformers(all_shared, ordered, L):
    # L > 1 under sdpa: the full-attention layers get no mask, and transformers' sdpa wrapper then
    # passes is_causal=True (top-left aligned: query i sees entries 0..i of the target's), against the
    # bidirectional mask it means; its eager attention reads the mask as meant
    ref = hf_assistant(ordered, seed=L, attn="sdpa" if L == 1 else "eager")
    ours = Gemma4AssistantForCausalLM(from_hf_assistant_config(ref.config)).eval()
    theirs = ref.state_dict()
    mine = ours.state_dict()
    assert sorted(mine) == sorted(theirs)  # transformers' names, every one
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    ours.load_state_dict(theirs)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, as transformers
    embeds, pos, kv = target_states(L, seed=10 + L)
    with torch.no_grad():
        want = ref(inputs_embeds=embeds, position_ids=pos, shared_kv_states=kv, output_hidden_states=True)
        logits, projected = ours(embeds, pos, kv)
    assert logits.shape == (1, L, V) and projected.shape == (1, L, HB)
    torch.testing.assert_close(logits, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(projected, want.last_hidden_state, atol=1e-4, rtol=0)
    if ordered:  # 2 of 8 clusters of 8 tokens: 16 exact logits per row, the rest at the floor
        floor = logits.min()
        assert ((logits > floor).sum(-1) == 16).all()


def test_sliding_mask_is_transformers_flipped_window(all_shared):
    """Query i sees the last window + 1 + i entries: changing an entry outside that changes nothing."""
    ref = hf_assistant(False, seed=0)
    ours = Gemma4AssistantForCausalLM(from_hf_assistant_config(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    embeds, pos, kv = target_states(1, seed=3)
    with torch.no_grad():
        base, _ = ours(embeds, pos, kv)
        k, v = kv["sliding_attention"]
        k2 = k.clone()
        k2[:, :, 0] += 5.0  # entry 0 of 5: outside the last 4 (window 3 + 1) that query 0 sees
        same, _ = ours(embeds, pos, {**kv, "sliding_attention": (k2, v)})
        k2[:, :, 1] += 5.0  # entry 1: inside
        moved, _ = ours(embeds, pos, {**kv, "sliding_attention": (k2, v)})
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    assert (moved - base).abs().max() > 1e-3


def test_missing_shared_kv_is_named():
    cfg = get_assistant_preset("e2b")
    with torch.device("meta"):
        model = Gemma4AssistantForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"shared_kv has no \['full_attention'\] entry"):
        model(torch.zeros(1, 1, 2 * 1536, device="meta"), torch.zeros(1, 1, dtype=torch.long, device="meta"),
              {"sliding_attention": (torch.zeros(1, 1, 4, 256, device="meta"),) * 2})


@pytest.mark.parametrize("size", list(ASSISTANT_PRESETS))
def test_presets_read_their_targets_kv(size):
    """On the meta device: a drafting step over K / V shaped as the target's caches runs and
    returns (1, 1, vocab) logits and a state of the target's hidden size."""
    from fxport.models.gemma4.config import FULL, SLIDING, get_preset

    cfg, tgt = get_assistant_preset(size), get_preset(size)
    assert cfg.backbone_hidden_size == tgt.hidden_size and cfg.text.num_hidden_layers == 4
    with torch.device("meta"):
        model = Gemma4AssistantForCausalLM(cfg)
        kv = {t: (torch.zeros(1, tgt.kv_heads_for(t), n, tgt.head_dim_for(t)),) * 2
              for t, n in ((SLIDING, tgt.sliding_window), (FULL, 100))}
        logits, state = model(torch.zeros(1, 1, 2 * tgt.hidden_size), torch.zeros(1, 1, dtype=torch.long), kv)
    assert tuple(logits.shape) == (1, 1, tgt.vocab_size) and tuple(state.shape) == (1, 1, tgt.hidden_size)
