"""runtime/image.py vs transformers' Gemma4ImageProcessorPil on the same PIL images (exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from fxport.runtime.image import ImageError, preprocess_image, target_size


def _image(h: int, w: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(8, 400), w=st.integers(8, 400), mode=st.sampled_from(["RGB", "RGBA", "L"]),
       soft=st.sampled_from([70, 140]), seed=st.integers(0, 1000))
def test_matches_transformers_processor(h, w, mode, soft, seed):
    im = _image(h, w, mode, seed)
    hf = Gemma4ImageProcessorPil(max_soft_tokens=soft)(im, return_tensors="pt")
    ours = preprocess_image(im, patch_size=16, pooling_kernel_size=3, max_soft_tokens=soft)
    assert ours.num_soft_tokens == int(hf["num_soft_tokens_per_image"][0])
    assert torch.equal(ours.position_ids, hf["image_position_ids"][0])
    # pixel values: identical up to float32 rounding of the 1/255 rescale
    assert (ours.pixel_values - hf["pixel_values"][0].float()).abs().max().item() <= 1e-6


def test_sizes_are_multiples_of_patch_times_pooling():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    assert target_size(480, 640, 16, 280 * 9, 3) == (672, 912)  # 42 x 57 patches = 2394 <= 2520
    assert target_size(10, 4000, 16, 70 * 9, 3) == (48, 3360)  # very wide: one cell row, capped at 70 cells
    for (h, w) in [(1, 1), (33, 17), (1000, 3), (10, 4000), (4000, 10), (224, 224)]:
        th, tw = target_size(h, w, 16, 70 * 9, 3)
        assert (th, tw) == get_aspect_ratio_preserving_size(h, w, 16, 70 * 9, 3)
        assert th % 48 == 0 and tw % 48 == 0 and th * tw <= 70 * 9 * 256


def test_unreadable_and_missing_images_raise_clear_errors(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"cannot read image .*photo\.png"):
        preprocess_image(bad, 16, 3)
    with pytest.raises(ImageError, match=r"no such image file: .*missing\.png"):
        preprocess_image(tmp_path / "missing.png", 16, 3)
