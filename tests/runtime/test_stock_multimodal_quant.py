"""``fxport export --hf DIR --quant balanced``: the quantized multimodal program runs in ExecuTorch's
stock ``MultimodalRunner`` exactly as in fxport's runtime, and its int8 encoders stay close to
the float ones.

The checkpoint is test_stock_multimodal_runner's tiny "e-model" (per-layer embeddings, vision
tower patch 2 / pooling 2, a 1-layer audio tower), saved as a transformers directory with its
tokenizer (the calibration text's encoder). One build: the ``balanced`` recipe on the text
decoder, the encoders int8 per channel (the default with ``--quant``). Pass criteria:
  * the runner's greedy tokens for [tokens, image, text] (one fresh process, the repo's
    :class:`~fxport.runtime.stock_multimodal_runner.StockMultimodalRunner`) == fxport's
    :class:`~fxport.runtime.multimodal.RunnerLayoutBackend` greedy tokens on the same ``.pte``
    (exact: the same program, the same kernels), and the prompt lengths are equal;
  * the program's ``vision_encoder`` / ``audio_encoder`` output vs the float eager encoders
    (runner_methods' VisionEncoder / AudioEncoder) on the soft tokens' embedding columns:
    cosine >= COS_MIN (measured 0.99969 image / 0.99998 audio on this model; the float program: 1.000000);
  * the export prints the quantization it did (the recipe on the text decoder, every encoder
    linear int8).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from fxport.cli import main
from fxport.runtime.generate import generate
from fxport.runtime.multimodal import RunnerLayoutBackend
from fxport.tests.models.multimodal_helpers import IMG, VOCAB, audio_hf_config, hf_multimodal_config, hf_vision_config, pair
from fxport.tests.runtime.stock_runner_helpers import tiny_tokenizer
from fxport.tests.runtime.test_stock_multimodal_runner import (
    CHUNK,
    CONFIGS,
    FRAMES,
    NEW,
    POSITIONS,
    POST,
    PRE,
    SOFT,
    _clip,
    _image,
    _text_config,
)

COS_MIN = 0.999  # int8 per-channel encoders vs float32, soft tokens' embedding columns

_RUNNER = r"""
import json, sys, torch
from fxport.runtime.stock_multimodal_runner import StockMultimodalRunner, Tokens
a = json.loads(sys.argv[1])
image = torch.load(a["image"])
g = StockMultimodalRunner(a["pte"], a["tokenizer"]).generate([Tokens(a["pre"]), ("image", image), a["post"]], a["new"])
print("RESULT " + json.dumps({"pieces": g.pieces, "prompt_tokens": g.prompt_tokens}))
"""


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm-quant")
    spec = CONFIGS["e-model"]
    text = _text_config(spec["ple"], spec["bidir"], spec["k_eq_v"])
    hf_cfg = hf_multimodal_config(text, hf_vision_config(pooling=2), audio=audio_hf_config())
    hf, ours = pair(hf_cfg, seed=spec["seed"], max_seq_len=POSITIONS)
    tokenizer = tiny_tokenizer(VOCAB)
    hf.save_pretrained(d / "ckpt")
    tokenizer.save(d / "ckpt" / "tokenizer.json")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--hf", str(d / "ckpt"), "--out", str(d / "q.pte"), "--quant", "balanced",
                   "--max-seq-len", str(POSITIONS), "--max-prefill-chunk", str(CHUNK), "--max-soft-tokens", str(SOFT),
                   "--max-audio-frames", str(FRAMES), "--quiet"])
    assert rc == 0, buf.getvalue()
    image = _image(spec["seed"])
    torch.save(image, d / "image.pt")
    args = {"pte": str(d / "q.pte"), "tokenizer": str(d / "q.tokenizer" / "tokenizer.json"), "image": str(d / "image.pt"),
            "pre": PRE, "post": POST, "new": NEW}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"runner process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return dict(dir=d, ours=ours, tokenizer=tokenizer, image=image, clip=_clip(spec["seed"]), printed=buf.getvalue(),
                runner=json.loads(lines[-1][len("RESULT "):]))


def test_export_reports_the_quantization(quantized):
    printed = quantized["printed"]
    assert "text decoder: " in printed and "balanced" in printed
    for name in ("vision_tower", "embed_vision", "audio_tower", "embed_audio"):
        line = next(x for x in printed.splitlines() if x.startswith(f"{name}: "))
        assert line.endswith(" linear(s) int8 per channel, 0 float") and not line.startswith(f"{name}: 0 "), line


def test_runner_tokens_equal_fxport_runtime(quantized):
    from PIL import Image

    tok = quantized["tokenizer"]
    post = tok.encode(POST, add_bos=False)
    pil = Image.fromarray(quantized["image"].permute(1, 2, 0).numpy())
    ours = generate(RunnerLayoutBackend(quantized["dir"] / "q.pte"), None, PRE + [IMG] + post, NEW, images=[pil])
    vocab = {piece.replace("▁", " "): i for piece, i in tok.backend.get_vocab().items()}
    runner = [vocab[p] for p in quantized["runner"]["pieces"]]
    assert len(ours.tokens) == NEW
    assert runner == ours.tokens
    assert quantized["runner"]["prompt_tokens"] == len(ours.prompt_tokens)


def _cos(got: torch.Tensor, ref: torch.Tensor, H: int) -> float:
    """Cosine over the soft tokens' embedding columns (rows 1..-1: boi / eoi are token lookups)."""
    a, b = got[0, 1:-1, :H].double().flatten(), ref[0, 1:-1, :H].double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_int8_encoders_close_to_float(quantized):
    from fxport.models.gemma4.runner_methods import AudioEncoder, VisionEncoder

    ours = quantized["ours"]  # the float eager model (the build quantized its own copy)
    H = ours.config.text.hidden_size
    backend = RunnerLayoutBackend(quantized["dir"] / "q.pte")
    image, clip = quantized["image"], quantized["clip"]
    with torch.no_grad():
        ref_image = VisionEncoder(ours, SOFT).eval()(image)
        ref_audio = AudioEncoder(ours).eval()(clip)
    got_image, got_audio = backend.encode_image(image), backend.encode_audio(clip)
    assert got_image.shape == ref_image.shape and got_audio.shape == ref_audio.shape
    cos_image, cos_audio = _cos(got_image, ref_image, H), _cos(got_audio, ref_audio, H)
    assert cos_image >= COS_MIN and cos_audio >= COS_MIN, (cos_image, cos_audio)
    assert cos_image < 1.0 - 1e-9  # int8, not float: the encoders were quantized


def test_unknown_recipe_is_refused(quantized, tmp_path, capsys):
    assert main(["export", "--hf", str(quantized["dir"] / "ckpt"), "--out", str(tmp_path / "x.pte"), "--quant", "nope"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "unknown --quant recipe 'nope' for --backend xnnpack; choose one of: 8da4w, 8da4w-head8, 8da8w, balanced, "
        "compact, default, sensitive")
    assert not (tmp_path / "x.pte").exists()


def test_encoder_precision_float_leaves_the_towers_alone():
    """``--encoder-precision float``: the recipe reaches the text decoder only (TextView hides the
    towers); "int8" quantizes every linear of the towers and their embedders."""
    from fxport.builder.multimodal import ENCODER_MODULES, quantize_multimodal

    spec = CONFIGS["e-model"]
    cfg = hf_multimodal_config(_text_config(spec["ple"], spec["bidir"], spec["k_eq_v"]), hf_vision_config(pooling=2),
                               audio=audio_hf_config())
    _, model = pair(cfg, seed=spec["seed"], max_seq_len=POSITIONS)
    towers = {n: {k: v.clone() for k, v in getattr(model.model, n).state_dict().items()} for n in ENCODER_MODULES}
    report = quantize_multimodal(model, "8da8w", encoder_precision="float")
    assert report.encoders == {} and len(report.text.quantized) == 20
    for n in ENCODER_MODULES:
        after = getattr(model.model, n).state_dict()
        assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in towers[n].items()), n
    report = quantize_multimodal(model, None, encoder_precision="int8")
    assert report.text is None
    assert report.encoders == {"vision_tower": (8, 0), "embed_vision": (1, 0), "audio_tower": (13, 0), "embed_audio": (1, 0)}
