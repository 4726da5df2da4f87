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


@pytest.mark.parametrize("n", [480, 4_000, 16_000, 23_456])
def test_prepare_audio_counts_placeholders_as_the_hf_processor(extractor, n):
    """Waveform, extractor output and (features, mask) give the same encoder inputs; the soft-token
    count equals Gemma4Processor's (from the sample count and from the frame mask)."""
    import types

    import torch
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    from fxport.runtime.audio import prepare_audio

    w = clip(n, seed=1)
    ref = extractor([w], return_tensors="np")
    from_wave = prepare_audio(w, n_mels=128, max_frames=160)
    from_hf = prepare_audio(ref, n_mels=128, max_frames=160)
    from_pair = prepare_audio((ref["input_features"][0], ref["input_features_mask"][0]), n_mels=128, max_frames=160)
    for a in (from_hf, from_pair):
        assert torch.equal(a.input_features, from_wave.input_features)
        assert torch.equal(a.input_features_mask, from_wave.input_features_mask)
    assert from_wave.input_features.shape == (1, 160, 128)
    proc = types.SimpleNamespace(feature_extractor=extractor, audio_seq_length=750, boa_token="<a>",
                                 audio_token="@", eoa_token="</a>")
    assert from_wave.num_soft_tokens == Gemma4Processor._compute_audio_num_tokens(proc, w, 16_000)
    text = Gemma4Processor.replace_audio_token(proc, {"input_features_mask": ref["input_features_mask"]}, 0)
    assert from_wave.num_soft_tokens == text.count("@")


def test_prepare_audio_errors_name_the_fix():
    import torch

    from fxport.runtime.audio import AudioError, prepare_audio

    with pytest.raises(AudioError, match="has 25 mel frames but the program's audio_encoder takes at most 20"):
        prepare_audio(clip(4_000), max_frames=20)
    with pytest.raises(AudioError, match="have 64 mel bins but the model's audio encoder takes 128"):
        prepare_audio((torch.zeros(10, 64), torch.ones(10, dtype=torch.bool)), n_mels=128)
    with pytest.raises(AudioError, match="one clip per call"):
        prepare_audio((torch.zeros(2, 10, 128), torch.ones(2, 10, dtype=torch.bool)))
    with pytest.raises(AudioError, match="no real frames"):
        prepare_audio((torch.zeros(10, 128), torch.zeros(10, dtype=torch.bool)))
    with pytest.raises(AudioError, match="has no \\['input_features_mask'\\]"):
        prepare_audio({"input_features": torch.zeros(1, 10, 128)})
