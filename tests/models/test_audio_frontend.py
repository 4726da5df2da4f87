"""fxport.runtime.audio.log_mel_features vs transformers' Gemma4AudioFeatureExtractor (defaults).

Synthetic waveforms (a tone plus noise) of lengths around the frame, hop and 128-sample padding
boundaries, and one past the 30 s cut. Tolerance: features max-abs <= 1e-5 (float32 output of
the same float32 / float64 steps; bit-equal here), masks exactly equal.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from fxport.models.gemma4.audio import audio_output_length
from fxport.runtime.audio import log_mel_features

ATOL = 1e-5


@pytest.fixture(scope="module")
def extractor():
    return Gemma4AudioFeatureExtractor()


def clip(n: int, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / 16_000
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("n", [200, 320, 321, 479, 480, 481, 4_000, 12_345, 480_100])
def test_matches_transformers_feature_extractor(extractor, n):
    w = clip(n, seed=n)
    ref = extractor([w], return_tensors="np")  # a list: HF's bare 1-D path fails to squeeze
    feats, mask = log_mel_features(w)
    rf, rm = ref["input_features"][0], ref["input_features_mask"][0]
    assert feats.dtype == np.float32 and feats.shape == rf.shape
    assert np.array_equal(mask, rm)
    assert np.abs(feats - rf).max() <= ATOL


def test_pad_to_program_frames(extractor):
    w = clip(4_000)
    feats, mask = log_mel_features(w, pad_to=40)
    short, short_mask = log_mel_features(w)
    assert feats.shape == (40, 128) and mask.shape == (40,)
    assert np.array_equal(feats[: len(short)], short) and not mask[len(short):].any()
    assert not feats[len(short):].any()
    assert audio_output_length(40) == 10


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="resample the clip to 16000 Hz"):
        log_mel_features(clip(1000), sampling_rate=44_100)
    with pytest.raises(ValueError, match="average the channels of a stereo clip"):
        log_mel_features(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="has 25 mel frames but the program takes at most pad_to=10"):
        log_mel_features(clip(4_000), pad_to=10)
