"""FixedSlotFusion on transformers' Llava and PaliGemma image+text prefill (tiny random, 5.23).

Each model is wrapped the way ``transformers.integrations.executorch`` wraps decoders (static
cache registered as buffers) with ``pixel_values`` passed through (examples/hf_llava.py's
``ImageTextPrefill``), so the image merge
(``masked_scatter`` of the projected image features into the token embeddings, and transformers'
placeholder-count check around it) is in the graph, and exported non-strict. Reference: the same
program without the pass, and the eager model.
"""

from __future__ import annotations

import pytest
import torch

from fxport.passes import FixedSlotFusion, apply
from fxport.passes.match import is_op

transformers = pytest.importorskip("transformers")

from fxport.examples.hf_llava import ImageTextPrefill  # noqa: E402  (the example's wrapper, tested as written)

aten = torch.ops.aten
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)
IMAGE_ID = 60


def llava():
    cfg = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT).to_dict(), vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(),
        image_token_id=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(cfg), 16  # 4x4 patches; "default" drops the CLS feature


def paligemma():
    cfg = transformers.PaliGemmaConfig(
        text_config=transformers.GemmaConfig(**TEXT).to_dict(), vision_config=transformers.SiglipVisionConfig(**VISION).to_dict(),
        image_token_id=IMAGE_ID, projection_dim=32,
    )
    return transformers.PaliGemmaForConditionalGeneration(cfg), 16  # SigLIP: one feature per patch


@pytest.mark.parametrize("make", [llava, paligemma], ids=lambda f: f.__name__)
def test_image_text_prefill_fused(make):
    torch.manual_seed(0)
    model, n_image = make()
    model = model.eval()
    model.generation_config.cache_implementation = "static"
    ids = torch.tensor([[1] + [IMAGE_ID] * n_image + [5, 6, 7]])
    pixels, pos = torch.randn(1, 3, 16, 16), torch.arange(ids.shape[1])
    wrapper = ImageTextPrefill(model, batch_size=1, max_cache_len=32)
    with torch.no_grad():
        ep = torch.export.export(wrapper, (ids, pixels, pos), strict=False)
    reference = apply(ep, [], dump=False).ep
    res = apply(reference, [FixedSlotFusion()], method="prefill", dump=False)
    stats = res["fixed_slot_fusion"].stats
    assert (stats.matched, stats.rewritten, dict(stats.skipped)) == (1, 1, {}), res.summary()
    ops = [n for n in res.ep.graph.nodes if n.op == "call_function"]
    assert not any(is_op(n, aten.masked_scatter, aten.nonzero, aten.item, aten._assert_scalar) for n in ops)

    # Placeholders where the prompt has them, and moved elsewhere (the dynamic mode is exact for any layout).
    moved = torch.tensor([[IMAGE_ID] * 8 + [3, 4] + [IMAGE_ID] * 8 + [9, 2]])
    for tokens in (ids, moved):
        expected = reference.module()(tokens, pixels, pos)
        assert torch.equal(res.ep.module()(tokens, pixels, pos), expected)  # bit-identical
    if make is llava:  # the unrewritten export equals transformers' eager forward (sanity of the setup)
        with torch.no_grad():
            eager = ImageTextPrefill(model, batch_size=1, max_cache_len=32)(ids, pixels, pos)
        torch.testing.assert_close(reference.module()(ids, pixels, pos), eager, rtol=1e-5, atol=1e-5)
    # PaliGemma: torch.export of transformers' own forward already differs from eager (max abs 0.058
    # on these logits, raw ``ep.module()`` before any fxport step), so only the fused-vs-unfused
    # comparison above is asserted for it.
