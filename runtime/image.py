"""Image preprocessing for Gemma 4, as transformers' ``Gemma4ImageProcessorPil`` does it (Pillow only).

``preprocess_image(image, patch_size, pooling_kernel_size, max_soft_tokens)`` ->
:class:`ImageInput` with
  * pixel_values (max_patches, 3 * patch**2) float32 in [0, 1], max_patches = max_soft_tokens *
    k**2 (k = pooling_kernel_size): the image converted to RGB (transparency composited on
    white), resized (bicubic) keeping its aspect ratio to the largest size whose sides are
    multiples of patch * k and that gives at most max_patches patches, cut into patches
    row-major, each flattened (row, column, channel), zero rows after the real patches;
  * position_ids (max_patches, 2) int64 (column, row) per patch, (-1, -1) on padding;
  * num_soft_tokens = real patches / k**2: the image's placeholder count in the prompt.

Images of more than 8 bits per sample (16-bit grayscale PNG, Pillow modes ``I;16`` / ``I``;
float TIFF, mode ``F``) are scaled to 8 bits by their range (65535, or 1.0 for float data in
[0, 1]), never clipped at 255. Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
stands: an image over twice it is refused with one line; one between the limit and twice it
loads without Pillow's warning.

``resize_image(image, patch_size, pooling_kernel_size, max_soft_tokens)`` -> (uint8 (3, H, W),
num_soft_tokens): the same RGB conversion and resize, nothing more: what ExecuTorch's
``MultimodalRunner`` layout's ``vision_encoder`` takes (it rescales and patchifies in the graph).

Errors are :class:`ImageError` (a ValueError) naming the file and the fix.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_SOFT_TOKENS = 280


class ImageError(ValueError):
    """An image that cannot be read or used; the message names it and says what to do."""


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # (max_patches, 3 p^2) float32 in [0, 1]
    position_ids: torch.Tensor  # (max_patches, 2) int64, (column, row); (-1, -1) on padding
    num_soft_tokens: int
    size: tuple[int, int]  # (height, width) after resizing


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int) -> tuple[int, int]:
    """(height, width) after the aspect-preserving resize (transformers' arithmetic, same edge cases)."""
    side = pooling_kernel_size * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"image of {height}x{width} pixels resizes to 0x0; it is too small for {side}-pixel cells")
    longest = (max_patches // pooling_kernel_size**2) * side
    if th == 0:  # very wide: one cell high, as wide as the ratio allows
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > max_patches * patch_size**2:
        raise ImageError(
            f"image of {height}x{width} pixels would resize to {th}x{tw}, more than {max_patches} patches; "
            "crop it to a less extreme aspect ratio"
        )
    return th, tw


def load_image(image: Any):
    """A PIL image in RGB from a path or a PIL image (transparency composited on white)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        try:
            with warnings.catch_warnings():  # a large image (below the refusal) loads quietly
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.load()
                    image = im.copy()
        except Image.DecompressionBombError as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels.group(1))} pixels" if pixels else "more pixels"
            raise ImageError(
                f"image {path} has {size}, more than the {2 * (Image.MAX_IMAGE_PIXELS or 0)} Pillow decodes "
                "safely; downscale it first (it is resized to a few hundred patches anyway)"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageError(
                f"cannot read image {path} ({type(exc).__name__}: {exc}); pass a PNG, JPEG or another "
                "format Pillow reads"
            ) from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected an image path or a PIL image, got {type(image).__name__}")
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one sample of more than 8 bits


def _to_8bit(image):
    """An ``I;16`` / ``I`` / ``F`` image as 8-bit ``L``, scaled by its range: 16-bit data by 65535,
    32-bit integers by 255 / 65535 / their maximum (the smallest that holds them), floats by 1.0
    when in [0, 1] (else 255, or their maximum); negative samples become 0."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float64)
    top = float(arr.max(initial=0.0))
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "I":
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    else:
        scale = 1.0 if top <= 1.0 else 255.0 if top <= 255 else top
    out = np.clip(np.rint(np.nan_to_num(arr) * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # (H, W) uint8: mode L


def _resized(image: Any, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int):
    """The RGB image at its target size (a PIL image)."""
    from PIL import Image

    if max_soft_tokens < 1:
        raise ImageError(f"max_soft_tokens={max_soft_tokens} must be >= 1")
    im = load_image(image)
    k, p = pooling_kernel_size, patch_size
    w, h = im.size
    th, tw = target_size(h, w, p, max_soft_tokens * k * k, k)
    if (th, tw) != (h, w):
        im = im.resize((tw, th), resample=Image.BICUBIC)
    return im


def resize_image(image: Any, patch_size: int, pooling_kernel_size: int,
                 max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> tuple[torch.Tensor, int]:
    """(uint8 (3, H, W) RGB at the target size, soft tokens): see the module docstring."""
    im = _resized(image, patch_size, pooling_kernel_size, max_soft_tokens)
    chw = torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))
    side = patch_size * pooling_kernel_size
    return chw, (chw.shape[1] // side) * (chw.shape[2] // side)


def preprocess_image(image: Any, patch_size: int, pooling_kernel_size: int,
                     max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> ImageInput:
    """See the module docstring. ``image``: a path or a PIL image."""
    im = _resized(image, patch_size, pooling_kernel_size, max_soft_tokens)
    k, p = pooling_kernel_size, patch_size
    max_patches = max_soft_tokens * k * k
    tw, th = im.size
    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    rows, cols = th // p, tw // p
    patches = arr.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    n = rows * cols
    pixel_values = torch.zeros(max_patches, 3 * p * p, dtype=torch.float32)
    pixel_values[:n] = torch.from_numpy(np.ascontiguousarray(patches))
    position_ids = torch.full((max_patches, 2), -1, dtype=torch.long)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    position_ids[:n] = torch.stack([c.reshape(-1), r.reshape(-1)], dim=-1)
    return ImageInput(pixel_values, position_ids, n // (k * k), (th, tw))
