"""Log-mel front end for Gemma 4 audio, in NumPy (no new dependency).

:func:`log_mel_features` turns a mono waveform into what transformers'
``Gemma4AudioFeatureExtractor`` returns for one clip with its defaults (16 kHz, 128 mel bins,
20 ms frames every 10 ms): ``input_features`` (T, 128) float32 and ``input_features_mask``
(T,) bool. The steps, as the extractor runs them:

1. the waveform (float32) is cut to ``max_samples`` (30 s) and zero-padded to a multiple of 128
   samples; a sample mask marks the real ones;
2. semicausal padding: ``frame_length // 2`` zeros in front, so frame i is centred on sample
   i * hop;
3. frames of ``frame_length + 1`` samples every ``hop`` samples; the last sample of each frame
   only serves the (optional) preemphasis and is dropped otherwise;
4. periodic Hann window, ``rfft`` of size 2^ceil(log2(frame_length)), magnitude;
5. HTK-scale triangular mel filters (no area normalisation) from ``min_frequency`` to
   ``max_frequency``; ``log(mel + mel_floor)``;
6. a frame is real when the last sample of its window is; features of padded frames are 0.

``pad_to`` pads the result to a program's fixed frame count (``audio_encoder`` is exported at
``max_audio_frames``): extra frames are zero with mask False, as the extractor pads a batch.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLING_RATE = 16_000


def hz_to_mel(f):
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filters(n_fft_bins: int, n_mels: int, min_frequency: float, max_frequency: float,
                sampling_rate: int) -> np.ndarray:
    """(n_fft_bins, n_mels) float64 triangles on the HTK mel scale, peak 1, edges at the
    neighbouring centres (n_mels + 2 points evenly spaced in mel)."""
    edges = mel_to_hz(np.linspace(hz_to_mel(min_frequency), hz_to_mel(max_frequency), n_mels + 2))
    bins = np.linspace(0, sampling_rate // 2, n_fft_bins)  # bin frequencies (Hz)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (bins[:, None] - lo[None]) / (mid - lo)[None]
    fall = (hi[None] - bins[:, None]) / (hi - mid)[None]
    return np.maximum(0.0, np.minimum(rise, fall))


def hann_periodic(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def log_mel_features(
    waveform,
    sampling_rate: int = SAMPLING_RATE,
    *,
    n_mels: int = 128,
    frame_length_ms: float = 20.0,
    hop_length_ms: float = 10.0,
    min_frequency: float = 0.0,
    max_frequency: float = 8000.0,
    mel_floor: float = 1e-3,
    max_samples: int = 480_000,
    pad_to_multiple_of: int = 128,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (T, n_mels) float32, mask (T,) bool) for one mono clip (see the module docstring)."""
    wav = np.asarray(waveform)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(
            f"log_mel_features: expected a non-empty mono waveform (1-D array of samples), got shape "
            f"{wav.shape}; average the channels of a stereo clip first."
        )
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(
            f"log_mel_features: sampling_rate={sampling_rate}, but Gemma 4 audio features are "
            f"computed at {SAMPLING_RATE} Hz; resample the clip to {SAMPLING_RATE} Hz first."
        )
    wav = wav.astype(np.float32)[:max_samples]
    n = wav.size
    padded = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    wav = np.pad(wav, (0, padded - n))
    real = np.arange(padded) < n  # sample mask

    frame = int(round(sampling_rate * frame_length_ms / 1000.0))
    hop = int(round(sampling_rate * hop_length_ms / 1000.0))
    n_fft = 2 ** math.ceil(math.log2(frame))
    wav = np.concatenate([np.zeros(frame // 2, np.float32), wav])
    real = np.concatenate([np.zeros(frame // 2, bool), real])
    span = frame + 1
    count = (wav.size - span) // hop + 1
    if count <= 0:
        feats, mask = np.zeros((0, n_mels), np.float32), np.zeros(0, bool)
    else:
        starts = np.arange(count) * hop
        frames = wav[starts[:, None] + np.arange(frame)[None]]  # (T, frame); sample `frame` unused
        mag = np.abs(np.fft.rfft(frames * hann_periodic(frame), n=n_fft, axis=-1))
        mel = mag @ mel_filters(n_fft // 2 + 1, n_mels, min_frequency, max_frequency, sampling_rate)
        mask = real[starts + span - 1]
        feats = (np.log(mel + np.float64(mel_floor)).astype(np.float32)) * mask[:, None]
    if pad_to is not None:
        if feats.shape[0] > pad_to:
            raise ValueError(
                f"log_mel_features: the clip has {feats.shape[0]} mel frames but the program takes at "
                f"most pad_to={pad_to} ({(pad_to - 1) * hop / sampling_rate:.2f} s); trim the clip or "
                f"re-export with a larger max_audio_frames."
            )
        extra = pad_to - feats.shape[0]
        feats = np.pad(feats, ((0, extra), (0, 0)))
        mask = np.pad(mask, (0, extra))
    return feats, mask
