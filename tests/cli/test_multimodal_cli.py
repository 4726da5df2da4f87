"""``fxport run --image F --audio F.wav [--chat]`` on a program in ExecuTorch MultimodalRunner's
layout, in fxport's runtime and in ExecuTorch's MultimodalRunner (``--runner executorch``).

One tiny random Gemma 4 (text: 1 global layer with per-layer embeddings; vision: patch 2,
pooling 2; audio: 1 conformer layer, 8 mel bins; the export is most of this file's time, so the
model is as small as the two towers allow: sliding layers, bidirectional images and the
runner's equality with transformers are tests/runtime/test_stock_multimodal_runner.py's) exported by
``fxport.builder.multimodal.export_runner_multimodal_pte``, with a tokenizer sidecar whose ids
are the model's (Gemma 4's turn and media tokens at the config's ids) and a chat template (an
instruction-tuned checkpoint: ``--chat`` is the default). A PNG and a 44.1 kHz stereo WAV go in
through the command line. Pass criteria (exact): the prompt ids equal those the chat format and
the processor layout give (checked token by token), fxport's runtime generates the eager model's
greedy tokens, and the command prints their text in both runtimes.
"""

from __future__ import annotations

import string
import wave

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken, decoders, normalizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from fxport.builder import fill_tokenizer_dir
from fxport.builder.multimodal import export_runner_multimodal_pte
from fxport.cli import main
from fxport.models.gemma4.tokenizer import SPIECE_SPACE, Tokenizer, encode_chat, user_message
from fxport.runtime.audio import load_audio_file
from fxport.runtime.generate import generate
from fxport.runtime.multimodal import MultimodalEagerBackend, RunnerLayoutBackend
from fxport.tests.models.multimodal_helpers import (
    AUD, BOA, BOI, EOA, EOI, IMG, VID, VOCAB, F, audio_hf_config, hf_multimodal_config, hf_text_config,
    hf_vision_config, pair,
)

SOFT, FRAMES, SEQ, NEW = 6, 40, 64, 5
PROMPT = "look <image> hear <audio> now"
MEDIA = {EOA: "<audio|>", BOA: "<|audio>", EOI: "<image|>", BOI: "<|image>", VID: "<|video|>", AUD: "<|audio|>",
         IMG: "<|image|>"}


def model_tokenizer() -> Tokenizer:
    """A Gemma-style BPE over exactly the model's 96 ids: <pad> <eos> <bos> <unk> <|turn> <turn|>,
    "\\n", "▁", a-z, merges, then the media tokens at the config's ids (89..95)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n", SPIECE_SPACE] + list(string.ascii_lowercase))}
    merges = []
    for left in [SPIECE_SPACE] + list(string.ascii_lowercase):
        for right in string.ascii_lowercase:
            if len(vocab) < min(MEDIA):
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    vocab.update({t: i for i, t in MEDIA.items()})
    assert sorted(vocab.values()) == list(range(VOCAB))
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials + list(MEDIA.values())])
    return Tokenizer(backend, 2, (1,), pad_id=0, add_bos=True,
                     chat_template="{{ bos_token }}{{- '<|turn>user\\n' -}} ... {{- '<|turn>model\\n' -}}")


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmcli")
    hf_cfg = hf_multimodal_config(hf_text_config(layer_types=(F,), ple=4), hf_vision_config(), audio=audio_hf_config())
    _, model = pair(hf_cfg, seed=5, max_seq_len=SEQ)
    pte = d / "tiny-mm.pte"
    export_runner_multimodal_pte(model, pte, max_soft_tokens=SOFT, max_audio_frames=FRAMES)
    tok = model_tokenizer()
    fill_tokenizer_dir(tok, d / "tiny-mm.tokenizer")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 8, 3), dtype=np.uint8)).save(d / "img.png")  # 3 x 2 cells -> 6
    t = np.arange(int(44100 * 0.2)) / 44100
    x = np.round(0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(d / "clip.wav"), "wb") as w:  # 0.2 s at 44.1 kHz stereo -> 20 frames -> 5 soft tokens
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(44100), w.writeframes(np.repeat(x, 2).tobytes())
    return dict(pte=pte, model=model, tok=tok, img=d / "img.png", wav=d / "clip.wav")


def expected(program):
    """The chat prompt's ids, laid out as the processor does, and the eager model's greedy tokens."""
    tok = program["tok"]
    ids = encode_chat(tok, [user_message(PROMPT, images=1, audio=1)], image_token_id=IMG, audio_token_id=AUD)
    eager = MultimodalEagerBackend(program["model"], max_soft_tokens=SOFT)
    clip = load_audio_file(program["wav"])
    return generate(eager, tok, ids, NEW, images=[program["img"]], audio=clip)


def test_prompt_layout_and_tokens_equal_the_eager_model(program):
    ref = expected(program)
    tok = program["tok"]
    turn = tok.encode("<|turn>user\nlook\n\n", add_bos=False)
    assert ref.prompt_tokens[:1 + len(turn)] == [2] + turn
    i = 1 + len(turn)
    assert ref.prompt_tokens[i:i + SOFT + 2] == [BOI] + [IMG] * SOFT + [EOI]
    j = ref.prompt_tokens.index(BOA)
    assert ref.prompt_tokens[j:j + 7] == [BOA] + [AUD] * 5 + [EOA]
    assert ref.prompt_tokens[-len(tok.encode("<|turn>model\n", add_bos=False)):] == tok.encode("<|turn>model\n",
                                                                                               add_bos=False)
    be = RunnerLayoutBackend(program["pte"])
    ids = encode_chat(tok, [user_message(PROMPT, images=1, audio=1)], image_token_id=IMG, audio_token_id=AUD)
    got = generate(be, tok, ids, NEW, images=[program["img"]], audio=str(program["wav"]))
    assert got.prompt_tokens == ref.prompt_tokens and got.tokens == ref.tokens


@pytest.mark.parametrize("runner", ["fxport", "executorch"])
def test_cli_run_with_image_and_audio(program, runner, capsys):
    ref = expected(program)
    argv = ["run", str(program["pte"]), "--prompt", PROMPT, "--image", str(program["img"]), "--audio",
            str(program["wav"]), "--max-new-tokens", str(NEW), "--no-stream", "--runner", runner]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == ref.text + "\n"
    assert f"{len(ref.prompt_tokens)} prompt tokens" in out.err


def test_cli_errors(program, capsys):
    base = ["run", str(program["pte"]), "--max-new-tokens", "2"]
    assert main(base + ["--prompt", "a <image> b <image>", "--image", str(program["img"])]) == 2
    assert "the prompt has 2 <image> marker(s) but 1 image input(s) were given" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", "--audio", str(program["img"])]) == 2
    assert capsys.readouterr().err == (f"fxport run: error: {program['img']} is not a WAV file (no RIFF/WAVE header); "
                                       f"fxport reads WAV only: convert it first, e.g. ffmpeg -i {program['img']} "
                                       "-ac 1 -ar 16000 -c:a pcm_s16le out.wav\n")


def test_cli_bench_with_image_and_audio(program, capsys):
    argv = ["bench", str(program["pte"]), "--image", str(program["img"]), "--audio", str(program["wav"]),
            "--prompt-len", "8", "--new-tokens", "4"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["program", "encode", "image", "ms", "encode", "audio", "ms", "prefill", "tok/s",
                                "decode", "tok/s"]
    row = lines[1].split()
    assert row[0] == str(program["pte"]) and all(float(x) > 0 for x in row[1:])
    # BOS + boi, 6 soft tokens, eoi + boa, 5 soft tokens, eoa + 8 text tokens
    assert lines[2].startswith("(prompt 24 positions: BOS, 1 image(s), 1 clip(s), 8 text tokens;")
    assert main(argv + ["--runner", "executorch"]) == 2
