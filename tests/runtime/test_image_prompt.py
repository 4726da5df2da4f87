"""Prompt layout, per-chunk feature rows and chunk bounds of fxport.runtime.multimodal (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fxport.runtime.multimodal import MultimodalError, build_prompt

IMG, BOI, EOI, H = 95, 92, 91, 3


class FakeBackend:
    """encode_image returns rows numbered by a call counter, so the test can tell them apart."""

    has_images, has_audio = True, False

    def __init__(self, bidirectional: bool):
        self.multimodal = dict(image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI, patch_size=2,
                               pooling_kernel_size=2, max_soft_tokens=6, bidirectional=bidirectional)
        self.calls = 0

    def encode_image(self, pv, pos):
        assert pv.shape == (24, 12) and pos.shape == (24, 2)
        self.calls += 1
        return torch.full((6, H), float(self.calls)) + torch.arange(6.0)[:, None] / 10


def _img(h, w):
    return Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8), "RGB")


def test_images_go_after_bos_and_rows_follow_placeholders():
    be = FakeBackend(False)
    p = build_prompt(be, [2, 7, 8], [_img(8, 8), _img(4, 8)], bos_id=2)
    # 8x8 px -> 4x4 patches -> 4 soft tokens; 4x8 px is upscaled to 4x12 -> 2x6 patches -> 3
    assert p.ids == [2, BOI] + [IMG] * 4 + [EOI, BOI] + [IMG] * 3 + [EOI, 7, 8]
    assert p.soft_tokens == [4, 3] and p.runs == [(2, 6), (8, 11)]
    assert torch.equal(p.image_rows[:, 0], torch.tensor([1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.2]))
    f = p.features(0, 4)["image_features"]  # placeholders at 2, 3
    assert torch.equal(f[:, 0], torch.tensor([1.0, 1.1]))
    assert torch.equal(p.features(4, 9)["image_features"][:, 0], torch.tensor([1.2, 1.3, 2.0]))
    assert p.features(11, 14)["image_features"] is None


def test_image_tokens_in_the_prompt_are_expanded_in_place():
    p = build_prompt(FakeBackend(False), [2, 5, IMG, 6, IMG], [_img(8, 8), _img(4, 8)], bos_id=2)
    assert p.ids == [2, 5, BOI] + [IMG] * 4 + [EOI, 6, BOI, IMG, IMG, IMG, EOI]


@settings(max_examples=30, deadline=None)
@given(chunk=st.integers(1, 9), bidir=st.booleans(), text=st.integers(0, 5))
def test_chunks_cover_the_prompt_and_keep_image_runs_whole_when_bidirectional(chunk, bidir, text):
    be = FakeBackend(bidir)
    ids = [2] + [7] * text
    if bidir and chunk < 4:
        with pytest.raises(MultimodalError, match="does not fit one prefill chunk"):
            build_prompt(be, ids, [_img(8, 8)], bos_id=2).chunks(chunk)
        return
    p = build_prompt(be, ids, [_img(8, 8), _img(4, 8)], bos_id=2)
    bounds = p.chunks(chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(p.ids)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(1 <= e - s <= chunk for s, e in bounds)
    rows = [p.features(s, e)["image_features"] for s, e in bounds]
    assert torch.equal(torch.cat([r for r in rows if r is not None]), p.image_rows)  # every row once, in order
    if bidir:
        for s, e in p.runs:
            assert any(a <= s and e <= b for a, b in bounds)  # no run split


def test_too_many_soft_tokens_for_the_encoder():
    with pytest.raises(MultimodalError, match="max_soft_tokens=9 exceeds the 6 soft tokens"):
        build_prompt(FakeBackend(False), [2], [_img(8, 8)], max_soft_tokens=9)


def test_length_is_checked_before_any_encoder_runs():
    be = FakeBackend(False)
    seen = []

    def too_long(total, added):
        seen.append((total, added))
        raise ValueError("too long")

    with pytest.raises(ValueError, match="too long"):
        build_prompt(be, [2, 7], [_img(8, 8), _img(4, 8)], bos_id=2, check_length=too_long)
    assert seen == [(2 + 6 + 5, 11)] and be.calls == 0  # 4 + 2 and 3 + 2 tokens; nothing encoded
