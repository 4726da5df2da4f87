"""ExecuTorch's stock ``MultimodalRunner`` runs fxport's multimodal Gemma 4 program exactly.

Two tiny random Gemma 4 models with a vision tower (patch 2, pooling 2):
  * "e-model": E2B / E4B-like: per-layer embeddings (PLE 4 per layer), causal image tokens, and an
    audio tower (1 conformer layer, 8 mel bins);
  * "31b-like": no PLE, k_eq_v global layers with their own KV head count, bidirectional
    attention inside an image (``use_bidirectional_attention="vision"``), no audio tower (as the
    26B / 31B checkpoints; the wrapper refuses audio for it).
The e-model is saved as a transformers checkpoint directory and built from it by ``fxport export
--hf DIR`` (:func:`fxport.builder.multimodal.build_multimodal`: program, weights and tokenizer
folder published together; it prints the methods it wrote); the 31b-like by
:func:`~fxport.builder.multimodal.export_runner_multimodal_pte` from the eager model. Both are in the
runner layout (token_embedding / text_decoder / vision_encoder / audio_encoder, XNNPACK) and run by
the runner in one fresh process on [tokens, image, text] and [tokens, audio, text]
(``make_token_input``, ``make_image_input`` of the uint8 (3, H, W) image,
``make_audio_input`` of the (1, F, 8) log-mel frames, ``make_text_input``). Pass criterion
(exact): the runner's greedy tokens == fxport's eager ``generate(images=[...])`` /
``generate(audio=...)`` tokens == transformers' ``Gemma4ForConditionalGeneration`` greedy
tokens (full-sequence recompute each step) on the same prompt, and the runner's prompt length ==
the prompt transformers sees (``boi + image * n + eoi``, ``boa + audio * n + eoa``). The
sliding window (3) is smaller than the ring (3 + 20 - 1 = 22 slots) and the sequences (32 and 25
positions) pass the ring, so the ring caches wrap.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import subprocess
import sys

import pytest
import torch
from transformers import Gemma4TextConfig

from fxport import contract
from fxport.builder.multimodal import export_runner_multimodal_pte
from fxport.cli import main
from fxport.runtime.generate import generate
from fxport.runtime.multimodal import MultimodalEagerBackend
from fxport.tests.models.multimodal_helpers import (
    AUD,
    BOA,
    BOI,
    EOA,
    EOI,
    IMG,
    VOCAB,
    F,
    S,
    audio_hf_config,
    hf_multimodal_config,
    hf_vision_config,
    mm_token_type_ids,
    pair,
)
from fxport.tests.runtime.stock_runner_helpers import tiny_tokenizer

CHUNK, SOFT, FRAMES, POSITIONS, NEW = 20, 16, 40, 64, 12
IMAGE_HW = (16, 12)  # pixels: 4 x 3 cells of 4 px -> 12 soft tokens (transformers' resize keeps this size)
CLIP_FRAMES = 17  # -> ceil(ceil(17 / 2) / 2) = 5 soft tokens
PRE = [2, 5, 9]  # BOS + two ids, given as make_token_input
LONG = [2] + [(7 * i) % 80 + 5 for i in range(26)]  # 27 ids: two text_decoder calls (20 + 7)
POST = "dab"  # make_text_input: the runner's tokenizer encodes it (no BOS: not the first segment)


def _text_config(ple: int, bidir: str | None, k_eq_v: bool) -> Gemma4TextConfig:
    extra = dict(attention_k_eq_v=True, num_global_key_value_heads=1) if k_eq_v else {}
    cfg = Gemma4TextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        layer_types=[S, F], sliding_window=3, final_logit_softcapping=30.0, hidden_size_per_layer_input=ple,
        use_bidirectional_attention=bidir, max_position_embeddings=256, **extra,
    )
    cfg._attn_implementation = "eager"
    return cfg


CONFIGS = {
    "e-model": dict(ple=4, bidir=None, k_eq_v=False, audio=True, seed=15, via="checkpoint"),
    "31b-like": dict(ple=0, bidir="vision", k_eq_v=True, audio=False, seed=15, via="model"),
}


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, *IMAGE_HW, generator=g) * 255).to(torch.uint8)  # (3, H, W)


def _clip(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, CLIP_FRAMES, 8, generator=g)  # (1, F, n_mels): every frame real


_RUNNER_SCRIPT = r"""
import json, sys, torch
from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_text_input, make_token_input
from fxport.runtime.stock_multimodal_runner import StockMultimodalRunner, Tokens
results = {}
for name, args in json.loads(sys.argv[1]).items():
    runner = StockMultimodalRunner(args["pte"], args["tokenizer"])
    image, clip = torch.load(args["inputs"])
    out = results[name] = {"methods": runner.methods, "constants": runner.constants}
    for kind, middle in (("image", image), ("audio", clip)):
        try:
            g = runner.generate([Tokens(args["pre"]), (kind, middle), args["post"]], args["new"])
            out[kind] = {"pieces": g.pieces, "prompt_tokens": g.prompt_tokens}
        except Exception as exc:
            out[kind] = {"error": str(exc)}
    try:  # fxport's wrapper refuses a size that is not whole cells
        runner.generate([Tokens(args["pre"]), ("image", image[:, :14])], args["new"])
    except Exception as exc:
        out["bad_image"] = str(exc)
    # the runner itself takes it: the graph drops the pixels past the last whole cell
    big = torch.randint(0, 256, (3, image.shape[1] + 3, image.shape[2] + 2), dtype=torch.uint8)
    big[:, : image.shape[1], : image.shape[2]] = image
    pieces = []
    runner._runner.reset()
    runner._runner.generate([make_token_input(args["pre"]), make_image_input(big), make_text_input(args["post"])],
                            GenerationConfig(echo=False, max_new_tokens=args["new"], temperature=0.0), pieces.append)
    out["padded_image"] = pieces
    try:  # more cells than max_soft_tokens (5 x 4 > 16): the program fails, never a truncated image
        runner._runner.reset()
        runner._runner.generate([make_token_input(args["pre"]), make_image_input(torch.zeros(3, 20, 16, dtype=torch.uint8))],
                                GenerationConfig(echo=False, max_new_tokens=2, temperature=0.0))
        out["oversize"] = "generated"
    except Exception as exc:
        out["oversize"] = type(exc).__name__
    g = runner.generate([Tokens(args["long"])], args["new"])  # more ids than one text_decoder call takes
    out["long"] = {"pieces": g.pieces, "prompt_tokens": g.prompt_tokens}
print("RESULT " + json.dumps(results))
"""


def _hf_greedy(hf, ids: list[int], steps: int, **media) -> list[int]:
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            t = torch.tensor([seq])
            nxt = int(hf(input_ids=t, mm_token_type_ids=mm_token_type_ids(t), **media).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def _build(name: str, d) -> dict:
    spec = CONFIGS[name]
    text = _text_config(spec["ple"], spec["bidir"], spec["k_eq_v"])
    hf_cfg = hf_multimodal_config(text, hf_vision_config(pooling=2), audio=audio_hf_config() if spec["audio"] else None)
    hf, ours = pair(hf_cfg, seed=spec["seed"], max_seq_len=POSITIONS)
    tokenizer = tiny_tokenizer(VOCAB)
    printed = ""
    if spec["via"] == "checkpoint":  # `fxport export --hf DIR`: transformers' files in, program + tokenizer out
        hf.save_pretrained(d / "ckpt")
        tokenizer.save(d / "ckpt" / "tokenizer.json")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["export", "--hf", str(d / "ckpt"), "--out", str(d / "mm.pte"), "--max-seq-len", str(POSITIONS),
                       "--max-prefill-chunk", str(CHUNK), "--max-soft-tokens", str(SOFT),
                       "--max-audio-frames", str(FRAMES), "--quiet"])
        assert rc == 0, buf.getvalue()
        printed = buf.getvalue()
        listed = printed.split("methods (ExecuTorch MultimodalRunner layout):\n")[1].splitlines()
        methods = [line.split(":")[0].strip() for line in itertools.takewhile(lambda x: x.startswith("  "), listed)]
    else:
        lowered = export_runner_multimodal_pte(ours, d / "mm.pte", max_prefill_chunk=CHUNK, max_soft_tokens=SOFT)
        methods = lowered.methods
        (d / "mm.tokenizer").mkdir()
        tokenizer.save(d / "mm.tokenizer" / "tokenizer.json")
    image, clip = _image(spec["seed"]), _clip(spec["seed"])
    torch.save((image, clip), d / "inputs.pt")
    args = {"pte": str(d / "mm.pte"), "tokenizer": str(d / "mm.tokenizer" / "tokenizer.json"),
            "inputs": str(d / "inputs.pt"), "pre": PRE, "post": POST, "new": NEW, "long": LONG}
    return dict(name=name, hf=hf, ours=ours, methods=methods, tokenizer=tokenizer, image=image, clip=clip, args=args,
                printed=printed)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both programs, then one fresh process running the stock runner on each."""
    cases = {name: _build(name, tmp_path_factory.mktemp(name)) for name in sorted(CONFIGS)}
    args = {name: c["args"] for name, c in cases.items()}
    proc = subprocess.run([sys.executable, "-c", _RUNNER_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"runner process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for name, out in json.loads(lines[-1][len("RESULT "):]).items():
        cases[name]["runner"] = out
    return cases


@pytest.fixture(params=sorted(CONFIGS))
def case(request, built):
    return built[request.param]


def _runner_ids(case, name: str) -> list[int]:
    vocab = {piece.replace("▁", " "): i for piece, i in case["tokenizer"].backend.get_vocab().items()}
    return [vocab[p] for p in case["runner"][name]["pieces"]]


def test_methods_and_constants(case):
    audio = CONFIGS[case["name"]]["audio"]
    written = [contract.TOKEN_EMBEDDING, contract.TEXT_DECODER, contract.VISION_ENCODER] + [contract.AUDIO_ENCODER] * audio
    assert case["methods"] == written
    assert case["runner"]["methods"] == sorted(written)
    c = case["runner"]["constants"]  # as the runner's process read them from the program
    ple = 2 * CONFIGS[case["name"]]["ple"]  # 2 layers x PLE width
    assert (c[contract.HIDDEN_SIZE], c[contract.PER_LAYER_COLUMNS], c[contract.EMBEDDING_DIM]) == (32, ple, 33 + ple)
    assert c[contract.BIDIRECTIONAL_VISION] == int(CONFIGS[case["name"]]["bidir"] == "vision")
    assert (c[contract.MAX_SEQ_LEN], c[contract.MAX_CONTEXT_LEN], c[contract.MAX_SOFT_TOKENS]) == (CHUNK, POSITIONS, SOFT)
    assert (c[contract.BOI_TOKEN_ID], c[contract.EOI_TOKEN_ID], c[contract.IMAGE_TOKEN_ID]) == (BOI, EOI, IMG)
    if audio:
        assert (c[contract.BOA_TOKEN_ID], c[contract.EOA_TOKEN_ID], c[contract.MAX_AUDIO_FRAMES]) == (BOA, EOA, FRAMES)
    else:
        assert contract.MAX_AUDIO_FRAMES not in c
        assert case["runner"]["audio"] == {"error": f"{case['args']['pte']} has no audio_encoder method; it takes no audio"}
    assert (c[contract.PATCH_SIZE], c[contract.POOLING_KERNEL_SIZE], c[contract.MAX_IMAGE_CELLS]) == (2, 2, SOFT)


def test_image_tokens_equal_eager_and_transformers(case):
    from PIL import Image

    from fxport.runtime.image import preprocess_image

    image = case["image"]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    post = case["tokenizer"].encode(POST, add_bos=False)
    backend = MultimodalEagerBackend(case["ours"], max_soft_tokens=SOFT, max_audio_frames=FRAMES)
    eager = generate(backend, None, PRE + [IMG] + post, NEW, images=[pil])
    n = IMAGE_HW[0] // 4 * (IMAGE_HW[1] // 4)
    assert eager.prompt_tokens == PRE + [BOI] + [IMG] * n + [EOI] + post
    pre = preprocess_image(pil, 2, 2, SOFT)
    assert pre.size == IMAGE_HW  # transformers' resize keeps this image's size: the runner sees the same pixels
    ref = _hf_greedy(case["hf"], eager.prompt_tokens, NEW, pixel_values=pre.pixel_values[None],
                     image_position_ids=pre.position_ids[None])
    assert not {IMG, AUD, BOI, EOI, BOA, EOA, 1} & set(ref)  # no placeholder / EOS fed back: a plain continuation
    assert eager.tokens == ref
    assert _runner_ids(case, "image") == ref
    assert case["runner"]["image"]["prompt_tokens"] == len(eager.prompt_tokens)


def test_audio_tokens_equal_eager_and_transformers(built):
    case = built["e-model"]  # the 26B / 31B checkpoints have no audio tower
    clip = case["clip"]
    mask = torch.ones(1, CLIP_FRAMES, dtype=torch.bool)
    post = case["tokenizer"].encode(POST, add_bos=False)
    backend = MultimodalEagerBackend(case["ours"], max_soft_tokens=SOFT, max_audio_frames=FRAMES)
    eager = generate(backend, None, PRE + [AUD] + post, NEW, audio=(clip, mask))
    assert eager.prompt_tokens == PRE + [BOA] + [AUD] * 5 + [EOA] + post
    ref = _hf_greedy(case["hf"], eager.prompt_tokens, NEW, input_features=clip, input_features_mask=mask)
    assert not {IMG, AUD, BOI, EOI, BOA, EOA, 1} & set(ref)
    assert eager.tokens == ref
    assert _runner_ids(case, "audio") == ref
    assert case["runner"]["audio"]["prompt_tokens"] == len(eager.prompt_tokens)


def test_image_not_in_whole_cells(case):
    """fxport's wrapper refuses it with the fix; the runner itself (which checks only upper bounds)
    gets the image's whole cells: an image with 3 / 2 extra pixel rows / columns generates
    exactly what the image does."""
    assert case["runner"]["bad_image"] == (
        "image of 14x12 pixels: the vision_encoder takes sides that are multiples of 4 pixels, 2 to 16 cells each; "
        "resize it with fxport.runtime.image.target_size (pass a path or PIL image and it is done for you)")
    assert case["runner"]["padded_image"] == case["runner"]["image"]["pieces"]
    assert case["runner"]["oversize"] == "RuntimeError"  # 20 cells > 16 soft tokens: the runner reports a failure


def test_export_prints_the_methods(built):
    printed = built["e-model"]["printed"]
    assert ("methods (ExecuTorch MultimodalRunner layout):\n"
            "  token_embedding: tokens int64 (1, T<=20) -> (1, T, 41) embedding columns\n"
            "  text_decoder: (1, T<=20, 41) + cache_position (T,) -> logits (1, 1, 96)\n"
            "  vision_encoder: image uint8 (3, H, W), H and W multiples of 4 px up to 16 cells (resize to <= 16 soft "
            "tokens) -> (1, cells + 2, 41)\n"
            "  audio_encoder: log-mel float32 (1, F, n_mels), F in [5, 40] real frames -> (1, ceil(F / 4) + 2, 41)\n"
            ) in printed


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--multimodal"], "a multimodal program is built from --hf DIR (a Gemma 4 checkpoint with a "
     "vision / audio config), not from preset tiny; drop --multimodal"),
    (["--preset", "tiny", "--multimodal", "--text-only"], "--multimodal and --text-only exclude each other; give one"),
])
def test_export_refusals(argv, message, tmp_path, capsys):
    assert main(["export", *argv, "--out", str(tmp_path / "x.pte")]) == 2
    assert capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "x.pte").exists()


def test_text_longer_than_one_call_is_a_chunked_prefill(case):
    """Token ids past ``get_max_seq_len`` go in as several segments (one call each): the runner's
    tokens equal fxport's eager greedy tokens on the same ids."""
    eager = generate(MultimodalEagerBackend(case["ours"], max_soft_tokens=SOFT, max_audio_frames=FRAMES), None, LONG, NEW)
    assert case["runner"]["long"]["prompt_tokens"] == len(LONG) > CHUNK
    assert _runner_ids(case, "long") == eager.tokens[: len(case["runner"]["long"]["pieces"])]
    assert len(case["runner"]["long"]["pieces"]) == len(eager.tokens)
