"""transformers' Llava image+text prefill, exported with a static cache, then FixedSlotFusion.

A random Llava (CLIP vision tower, Llama text model) is wrapped the way
``transformers.integrations.executorch`` wraps decoders (``TorchExportableModuleWithStaticCache``:
the static cache registered as buffers) with ``pixel_values`` passed through, and exported
non-strict. The image merge transformers exports, ``masked_scatter`` of the image features
into the token embeddings plus the placeholder-count check around it (``nonzero`` / ``item`` /
``_assert_scalar``), becomes an exact, export-friendly gather (``FixedSlotFusion(mode="dynamic")``),
so the program has no data-dependent op left for a backend to refuse.

    .venv/bin/python examples/hf_llava.py [--image-size 32 --patch 8]

The wrapper (``ImageTextPrefill``) is also the one tests/foreign/test_hf_llava.py exports Llava
and PaliGemma with.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from fxport.passes import FixedSlotFusion, apply

IMAGE_ID = 120


class ImageTextPrefill(TorchExportableModuleWithStaticCache):
    """transformers' static-cache export wrapper, with pixel_values passed through (the merge)."""

    def forward(self, input_ids, pixel_values, cache_position):
        for layer in self.static_cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=None,
                          past_key_values=self.static_cache, use_cache=True).logits


def op_counts(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=args.image_size, patch_size=args.patch)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.cache_implementation = "static"
    n_image = (args.image_size // args.patch) ** 2  # one feature per patch ("default" drops the CLS one)
    ids = torch.tensor([[1] + [IMAGE_ID] * n_image + [5, 6, 7]])
    pixels = torch.randn(1, 3, args.image_size, args.image_size)
    with torch.no_grad():
        ep = torch.export.export(ImageTextPrefill(model, batch_size=1, max_cache_len=128),
                                 (ids, pixels, torch.arange(ids.shape[1])), strict=False)

    print(f"transformers Llava: CLIP tower ({n_image} image tokens), Llama text model; prompt of {ids.shape[1]} tokens")
    before = apply(ep, [], dump=False).ep
    result = apply(before, [FixedSlotFusion()], method="prefill", dump=False)
    print(result.summary())
    ops_before, ops_after = op_counts(before), op_counts(result.ep)
    for op in ("aten.masked_scatter.default", "aten.nonzero.default", "aten.item.default", "aten._assert_scalar.default"):
        if ops_before[op]:
            print(f"  {op}: {ops_before[op]} -> {ops_after[op]}")
    same = torch.equal(result.ep.module()(ids, pixels, torch.arange(ids.shape[1])),
                       before.module()(ids, pixels, torch.arange(ids.shape[1])))
    print(f"logits identical to the unrewritten program: {same}")


if __name__ == "__main__":
    main()
