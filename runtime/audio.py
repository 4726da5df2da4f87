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

:func:`prepare_audio` turns what a caller has (the extractor's output, a (features, mask) pair,
or a waveform) into the encoder's inputs plus the clip's placeholder count; errors are
:class:`AudioError` naming the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

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


# ----------------------------------------------------------------------------- WAV files


class AudioError(ValueError):
    """Audio input that cannot be used; the message names the problem and the fix."""


MAX_SECONDS = 30.0  # the feature extractor's max_samples (480,000 at 16 kHz)
_CONVERT = "convert it first, e.g. ffmpeg -i {p} -ac 1 -ar 16000 -c:a pcm_s16le out.wav"
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE  # WAVE format tags


def read_wav(path) -> tuple[np.ndarray, int]:
    """A WAV file -> (mono waveform float32 in [-1, 1], sample rate).

    Reads RIFF/WAVE with integer PCM (8-bit unsigned, 16 / 24 / 32-bit signed) or IEEE float
    (32 / 64-bit) samples, plain or WAVE_FORMAT_EXTENSIBLE; channels are averaged. Anything else
    (compressed WAV, MP3, FLAC ...) is an :class:`AudioError` saying how to convert it."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"no such audio file: {path}")
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path} is not a WAV file (no RIFF/WAVE header); fxport reads WAV only: "
                         + _CONVERT.format(p=path))
    fmt = samples = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt " and len(body) >= 16:
            tag, channels, rate = (int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little"),
                                   int.from_bytes(body[4:8], "little"))
            bits = int.from_bytes(body[14:16], "little")
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = int.from_bytes(body[24:26], "little")  # the sub-format GUID's first two bytes
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            samples = body
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or samples is None:
        raise AudioError(f"{path}: the WAV file has no {'fmt' if fmt is None else 'data'} chunk (truncated?); "
                         + _CONVERT.format(p=path))
    tag, channels, rate, bits = fmt
    kinds = {(_PCM, 8): np.uint8, (_PCM, 16): "<i2", (_PCM, 32): "<i4", (_FLOAT, 32): "<f4", (_FLOAT, 64): "<f8"}
    if channels < 1 or rate < 1:
        raise AudioError(f"{path}: the WAV header says {channels} channel(s) at {rate} Hz; " + _CONVERT.format(p=path))
    width = bits // 8
    usable = len(samples) - len(samples) % (width * channels) if width else 0
    if (tag, bits) == (_PCM, 24):
        b = np.frombuffer(samples[:usable], np.uint8).reshape(-1, 3).astype(np.int32)
        wav = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2.0**23
    elif (tag, bits) in kinds:
        raw = np.frombuffer(samples[:usable], kinds[(tag, bits)])
        if tag == _FLOAT:
            wav = raw.astype(np.float32)
        elif bits == 8:
            wav = (raw.astype(np.float32) - 128.0) / 128.0
        else:
            wav = raw.astype(np.float32) / float(2 ** (bits - 1))
    else:
        what = {_PCM: f"{bits}-bit PCM", _FLOAT: f"{bits}-bit float"}.get(tag, f"format tag {tag:#x} (compressed)")
        raise AudioError(f"{path}: {what} WAV samples are not supported (fxport reads 8/16/24/32-bit PCM and "
                         "32/64-bit float); " + _CONVERT.format(p=path))
    wav = wav.reshape(-1, channels).mean(axis=1) if channels > 1 else wav
    if wav.size == 0:
        raise AudioError(f"{path}: the WAV file holds no samples; pass a clip with sound.")
    return wav.astype(np.float32), rate


def resample(wav: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """``wav`` at ``rate`` Hz -> ``target`` Hz by band-limited (FFT) resampling, as
    ``scipy.signal.resample`` does, on the clip padded with silence (so its end does not wrap
    onto its start). The output has ``round(len * target / rate)`` samples."""
    if rate == target:
        return wav
    n = wav.size
    out_n = int(round(n * target / rate))
    # The padded length maps to a whole number of output samples (so every frequency bin keeps its
    # frequency exactly): a multiple of rate / gcd, by a power of two, >= 0.1 s of silence after the clip.
    g = math.gcd(rate, target)
    step = rate // g
    pad = step * int(2 ** math.ceil(math.log2(-(-(n + rate // 10) // step))))
    spec = np.fft.rfft(wav.astype(np.float64), n=pad)
    new_pad = pad // step * (target // g)
    keep = min(spec.size, new_pad // 2 + 1)
    out_spec = np.zeros(new_pad // 2 + 1, np.complex128)
    out_spec[:keep] = spec[:keep]
    if new_pad > pad:  # upsampling: the old Nyquist bin holds both signs of that frequency; keep half
        out_spec[pad // 2] *= 0.5
    out = np.fft.irfft(out_spec, n=new_pad) * (new_pad / pad)
    return out[:out_n].astype(np.float32)


def load_audio_file(path, max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    """A WAV file as the 16 kHz mono waveform the log-mel front end takes (other rates are
    resampled by :func:`resample`). Longer than ``max_seconds`` (the feature extractor's 30 s)
    is an :class:`AudioError`: the extractor would cut the clip silently."""
    wav, rate = read_wav(path)
    seconds = wav.size / rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{path}: the clip lasts {seconds:.2f} s, more than the {max_seconds:g} s Gemma 4's audio "
                         f"front end takes; trim it (ffmpeg -i {path} -t {max_seconds:g} out.wav) or split it into "
                         "clips.")
    return resample(wav, rate)


# ----------------------------------------------------------------------------- prompt inputs


@dataclass
class AudioInput:
    input_features: torch.Tensor  # (1, T, n_mels) float32, T = the program's frame count when padded
    input_features_mask: torch.Tensor  # (1, T) bool, True on real frames
    num_soft_tokens: int  # audio_token placeholders the clip takes in the prompt


def prepare_audio(audio: Any, n_mels: int | None = None, max_frames: int | None = None) -> AudioInput:
    """One clip as the audio encoder takes it.

    ``audio``: the HF feature extractor's output (a mapping with ``input_features`` (1, T, M) or
    (T, M) and ``input_features_mask``), a ``(features, mask)`` pair of the same shapes, a 1-D
    16 kHz waveform (NumPy / torch), or a WAV file path (:func:`load_audio_file`); waveforms run
    through :func:`log_mel_features` (with ``n_mels`` bins, default 128).
    ``n_mels``: the width the encoder expects (checked); ``max_frames``: a fixed-shape program's
    frame count: the clip is padded to it (mask False), longer clips are an error.
    """
    if isinstance(audio, Mapping):
        missing = [k for k in ("input_features", "input_features_mask") if k not in audio]
        if missing:
            raise AudioError(f"audio: the mapping has no {missing}; pass the feature extractor's output "
                             "(input_features, input_features_mask) or a 16 kHz waveform.")
        feats, mask = audio["input_features"], audio["input_features_mask"]
    elif isinstance(audio, (tuple, list)) and len(audio) == 2:
        feats, mask = audio
    else:
        from pathlib import Path

        if isinstance(audio, (str, Path)):
            audio = load_audio_file(audio)
        wav = audio.numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if wav.ndim != 1:
            raise AudioError(
                f"audio: expected the feature extractor's output, a (features, mask) pair or a 1-D 16 kHz "
                f"waveform; got an array of shape {wav.shape}."
            )
        if wav.size > MAX_SECONDS * SAMPLING_RATE:
            raise AudioError(f"audio: the waveform lasts {wav.size / SAMPLING_RATE:.2f} s, more than the "
                             f"{MAX_SECONDS:g} s Gemma 4's audio front end takes; trim it or split it into clips.")
        feats, mask = log_mel_features(wav, n_mels=n_mels or 128)
    feats = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats).float()
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    if feats.dim() == 2:
        feats, mask = feats[None], mask.reshape(1, -1)
    if feats.dim() != 3 or feats.shape[0] != 1 or mask.shape != feats.shape[:2]:
        raise AudioError(
            f"audio: input_features {tuple(feats.shape)} and input_features_mask {tuple(mask.shape)} must be "
            "(1, T, n_mels) and (1, T) (one clip per call); pass clips one at a time."
        )
    if n_mels is not None and feats.shape[-1] != n_mels:
        raise AudioError(
            f"audio: the features have {feats.shape[-1]} mel bins but the model's audio encoder takes {n_mels}; "
            f"compute them with feature_size={n_mels}."
        )
    T = feats.shape[1]
    if max_frames is not None:
        if T > max_frames:
            raise AudioError(
                f"audio: the clip has {T} mel frames but the program's audio_encoder takes at most {max_frames} "
                f"({max_frames / 100:.2f} s at a 10 ms hop); trim the clip or re-export with a larger "
                "max_audio_frames."
            )
        feats = torch.nn.functional.pad(feats, (0, 0, 0, max_frames - T))
        mask = torch.nn.functional.pad(mask, (0, max_frames - T), value=False)
    n = int(mask[:, ::2][:, ::2].sum())  # the tower's two stride-2 subsamplings
    if n == 0:
        raise AudioError("audio: the clip has no real frames after subsampling (empty mask); pass a longer clip.")
    return AudioInput(feats, mask, n)


def audio_soft_tokens(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The encoder's (1, T', H) output and (1, T') mask -> (n, H): the valid rows, in order (host side)."""
    return features.reshape(-1, features.shape[-1])[valid.reshape(-1)]
