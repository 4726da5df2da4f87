"""WAV files for ``fxport run --audio``: fxport.runtime.audio.read_wav / resample / load_audio_file.

WAVs are written by Python's ``wave`` module (16-bit PCM) or by hand (8 / 24 / 32-bit PCM, 32-bit
float, WAVE_FORMAT_EXTENSIBLE). Tolerances: decoded samples within one quantization step of the
written float signal (2^-(bits-1)); resampled tones (faded in and out: a band-limited resampler
rings at an abrupt start / end) within 1e-5 of the analytic tone at 16 kHz.
"""

from __future__ import annotations

import struct
import wave

import numpy as np
import pytest

from fxport.runtime.audio import AudioError, load_audio_file, prepare_audio, read_wav, resample


def tone(rate: int, seconds: float, freqs=(440.0, 3100.0)) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    fade = np.sin(np.pi * t / seconds) ** 2
    return (fade * sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs)).astype(np.float32)


def write_riff(path, samples: bytes, tag: int, channels: int, rate: int, bits: int, extensible: bool = False):
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (tag first)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + bytes(14)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\0"
    body += b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_pcm16_stereo_is_averaged(tmp_path):
    left, right = tone(16000, 0.2), tone(16000, 0.2, (1000.0,))
    pcm = np.round(np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    wav, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and wav.dtype == np.float32 and wav.shape == left.shape
    assert np.abs(wav - (left + right) / 2).max() <= 2.0 ** -15


@pytest.mark.parametrize("bits,tag,extensible", [(8, 1, False), (24, 1, False), (32, 1, True), (32, 3, False),
                                                 (64, 3, True)])
def test_sample_formats(tmp_path, bits, tag, extensible):
    x = tone(8000, 0.05)
    if tag == 3:
        raw, step = x.astype("<f4" if bits == 32 else "<f8").tobytes(), 1e-7
    elif bits == 8:
        raw, step = np.round(x * 127 + 128).astype(np.uint8).tobytes(), 2.0 ** -7
    elif bits == 24:
        v = np.round(x * (2**23 - 1)).astype("<i4")
        raw, step = b"".join(int(s).to_bytes(3, "little", signed=True) for s in v), 2.0 ** -23
    else:
        raw, step = np.round(x * (2**31 - 1)).astype("<i4").tobytes(), 2.0 ** -31
    wav, rate = read_wav(write_riff(tmp_path / "x.wav", raw, tag, 1, 8000, bits, extensible))
    assert rate == 8000 and np.abs(wav - x).max() <= step + 1e-7


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_to_16k(rate):
    y = resample(tone(rate, 0.5), rate)
    assert y.size == round(0.5 * 16000)
    assert np.abs(y - tone(16000, 0.5)).max() < 1e-5  # 3.1 kHz is below every Nyquist here


def test_other_rates_are_resampled_on_load(tmp_path):
    pcm = np.round(tone(44100, 0.3) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "cd.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(44100), w.writeframes(pcm.tobytes())
    wav = load_audio_file(tmp_path / "cd.wav")
    assert wav.size == round(0.3 * 16000)
    assert np.abs(wav - tone(16000, 0.3)).max() < 1e-4  # 16-bit quantization


def test_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "a.mp3").write_bytes(b"ID3\x03\x00" + bytes(64))
    with pytest.raises(AudioError, match=r"a.mp3 is not a WAV file \(no RIFF/WAVE header\); fxport reads WAV only: "
                                         r"convert it first, e\.g\. ffmpeg -i .*a.mp3 -ac 1 -ar 16000"):
        read_wav(tmp_path / "a.mp3")
    with pytest.raises(AudioError, match="no such audio file"):
        read_wav(tmp_path / "missing.wav")
    adpcm = write_riff(tmp_path / "adpcm.wav", bytes(64), 2, 1, 16000, 4)
    with pytest.raises(AudioError, match=r"format tag 0x2 \(compressed\) WAV samples are not supported"):
        read_wav(adpcm)
    long = write_riff(tmp_path / "long.wav", bytes(2 * 8000 * 31), 1, 1, 8000, 16)
    with pytest.raises(AudioError, match=r"the clip lasts 31.00 s, more than the 30 s .* trim it \(ffmpeg -i .*long.wav "
                                         r"-t 30 out.wav\) or split it into clips"):
        load_audio_file(long)
    with pytest.raises(AudioError, match="the waveform lasts 30.50 s, more than the 30 s"):
        prepare_audio(np.zeros(int(16000 * 30.5), np.float32))


def test_a_wav_path_runs_through_the_log_mel_front_end(tmp_path):
    from fxport.runtime.audio import log_mel_features

    pcm = np.round(tone(16000, 0.4) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "c.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    a = prepare_audio(tmp_path / "c.wav", n_mels=8, max_frames=48)
    feats, mask = log_mel_features(pcm.astype(np.float32) / 32768, n_mels=8, pad_to=48)
    assert np.array_equal(a.input_features[0].numpy(), feats) and np.array_equal(a.input_features_mask[0].numpy(), mask)
    assert a.num_soft_tokens == int(mask[::2][::2].sum())
