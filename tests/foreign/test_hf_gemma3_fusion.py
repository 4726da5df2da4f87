"""FixedSlotFusion on graphs fxport did not produce: transformers' own tiny Gemma 3 (vision + text).

Script-like: build a random tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower, 4 soft tokens
per image, the real Gemma 3 image token id 262144, outside the 64-token vocabulary), export it
the way ``transformers.integrations.executorch`` does (static cache registered as buffers,
``torch.export``), apply the pass and compare numbers with the unrewritten program and eager.
"""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402
from transformers.integrations.executorch import (  # noqa: E402
    TorchExportableModuleForDecoderOnlyLM,
    TorchExportableModuleWithHybridCache,
)
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig  # noqa: E402
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig  # noqa: E402

from fxport.passes import FixedSlotFusion, apply  # noqa: E402
from fxport.passes.match import is_op  # noqa: E402

aten = torch.ops.aten
IMG = 262_144  # Gemma 3's image token id


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    text = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_id=IMG)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.generation_config.cache_implementation = "static"
    return model


class ImageTextWithCache(TorchExportableModuleWithHybridCache):
    """transformers' static-cache export wrapper, with pixel_values passed through (the merge)."""

    def forward(self, input_ids, pixel_values, cache_position):
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=None,
                         past_key_values=self.cache, use_cache=True)
        return out.logits


def test_image_text_prefill_non_strict(hf_model):
    """Non-strict export keeps transformers' placeholder-count checks (item/_assert_scalar)."""
    ids = torch.tensor([[2, IMG, IMG, IMG, IMG, 5, 6, 7]])
    pixels, pos = torch.randn(1, 3, 16, 16), torch.arange(8)
    ep = torch.export.export(ImageTextWithCache(hf_model, batch_size=1, max_cache_len=16), (ids, pixels, pos), strict=False)
    res = apply(ep, [FixedSlotFusion()], method="prefill", dump=False)
    stats = res.records[0].stats
    assert (stats.matched, stats.rewritten) == (1, 1)
    # transformers replaces the out-of-vocabulary image id by 0 itself (index_put), so the pass
    # finds no embedding of the raw ids to pad; it removes the 6 asserts of the count check.
    assert stats.sites[0]["embeddings_padded"] == 0 and stats.sites[0]["checks_removed"] == 6
    ops = [n for n in res.ep.graph.nodes if n.op == "call_function"]
    assert not any(is_op(n, aten.masked_scatter, aten.item, aten._assert_scalar, aten._is_all_true) for n in ops)
    # The static caches are real buffer mutations after normalization (not aliased constants).
    mutated = {s.target for s in res.ep.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"}
    assert {"key_cache_0", "value_cache_0", "key_cache_1", "value_cache_1"} <= mutated

    unrewritten = apply(ep, [], dump=False).ep
    for tokens in (ids, torch.tensor([[IMG, IMG, 9, IMG, 3, IMG, 4, 1]])):
        expected = unrewritten.module()(tokens, pixels, pos)
        assert torch.equal(res.ep.module()(tokens, pixels, pos), expected)  # bit-identical
        with torch.no_grad():
            eager = ImageTextWithCache(hf_model, batch_size=1, max_cache_len=16)(tokens, pixels, pos)
        torch.testing.assert_close(expected, eager, rtol=1e-5, atol=1e-5)  # export vs eager: fp32 reordering only


def test_text_decoder_export_has_no_merge(hf_model):
    """transformers' own decoder-only export feeds ids only: no merge in the graph, nothing changes."""
    wrapper = TorchExportableModuleForDecoderOnlyLM(hf_model, batch_size=1, max_cache_len=16)
    ep = wrapper.export(input_ids=torch.tensor([[2, 3, 4]]), cache_position=torch.arange(3))  # strict, as transformers
    res = apply(ep, [FixedSlotFusion()], dump=False)
    assert not res.changed
    assert res.records[0].stats.as_dict() == {
        "matched": 0, "rewritten": 0, "skipped": {"no masked_scatter in the graph": 1}, "sites": []
    }
