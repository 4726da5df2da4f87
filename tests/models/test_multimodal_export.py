"""Multimodal export: ExportedPrograms vs eager, the XNNPACK .pte vs eager, `fxport run --image`.

One tiny model (text: 1 sliding + 1 full layer, hidden 32, PLE; vision: 1 layer, patch 2,
pooling 2, 4 soft tokens per image; audio: 1 conformer layer, 24 mel frames per clip) is
exported and lowered once for the module into one .pte with image_encoder, audio_encoder,
prefill and decode (the lowering dominates the time). Tolerance: relative max error <= 1e-4 on fp32 logits and image features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fxport.cli import main
from fxport.tests.lowering.helpers import lower_fast
from fxport.lowering.xnnpack import apply_method_passes
from fxport.builder.multimodal import multimodal_passes, rewrite_multimodal_programs
from fxport.models.gemma4.export import export_methods, multimodal_metadata
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.models.gemma4.vision import compact_rows
from fxport.runtime.generate import ContextOverflowError, ExportedBackend, generate
from fxport.runtime.multimodal import MultimodalEagerBackend, MultimodalError, open_pte

from fxport.tests.models.multimodal_helpers import (
    IMG,
    audio_hf_config,
    audio_inputs,
    S,
    F,
    hf_multimodal_config,
    hf_text_config,
    hf_vision_config,
    image_inputs,
    pair,
    prompt_with_images,
    rel_max_err,
)

RTOL = 1e-4
CHUNK, SOFT, SEQ, FRAMES = 16, 4, 32, 24
FORBIDDEN = ("nonzero", "item", "_assert_scalar", "masked_scatter", "_local_scalar_dense")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    text = hf_text_config(layer_types=(S, F), ple=4, window=3)
    hf_cfg = hf_multimodal_config(text, hf_vision_config(pooling=2), audio=audio_hf_config())
    hf, ours = pair(hf_cfg, seed=4, max_seq_len=SEQ)
    with torch.no_grad():
        raw = export_methods(ours, max_prefill_chunk=CHUNK, multimodal=True, max_soft_tokens=SOFT,
                             max_audio_frames=FRAMES)
        programs, results = rewrite_multimodal_programs(ours, raw, CHUNK)
        lowered = lower_fast(programs, constant_methods=multimodal_metadata(ours, CHUNK, SOFT, FRAMES))
    path = lowered.save(tmp_path_factory.mktemp("mm") / "tiny-mm.pte")
    return dict(model=ours, raw=raw, programs=programs, results=results, lowered=lowered, path=path,
                audio_config=hf.config.audio_config)


def _inputs(model, seed: int = 0):
    """Two images (2x2 and 1x2 pooled cells, padded to 4 cells) and a prompt holding both."""
    g = torch.Generator().manual_seed(seed)
    pv, pos = image_inputs([(4, 4), (2, 4)], patch=2, max_patches=SOFT * 4, g=g)
    tokens = prompt_with_images(model.config, [4, 2], g)  # 20 tokens
    return pv, pos, tokens


def _ops(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_programs_are_static_and_fused(built):
    assert sorted(built["programs"]) == ["audio_encoder", "decode", "image_encoder", "prefill"]
    for method, ep in built["programs"].items():
        bad = sorted(o for o in _ops(ep) if any(f in o for f in FORBIDDEN))
        assert bad == [], f"{method}: {bad}"
    assert not [o for o in _ops(built["raw"]["image_encoder"]) if any(f in o for f in FORBIDDEN)]
    fusion = built["results"]["prefill"].results[0]  # FixedSlotFusion runs first
    assert (fusion.stats.matched, fusion.stats.rewritten) == (2, 2)  # the image and the audio merge
    # one KV-cache allocation shared by prefill and decode; the encoders mutate nothing
    for enc in ("image_encoder", "audio_encoder"):
        assert not built["programs"][enc].graph_signature.buffers_to_mutate
    assert built["lowered"].mutable_buffers == sorted(built["programs"]["decode"].graph_signature.buffers_to_mutate.values())


def _eager_steps(model, pv, pos, tokens, split: int):
    """Last-token logits of: prefill [0, split), prefill [split, L), two decode steps."""
    model.reset_caches()
    with torch.no_grad():
        feats, valid = model.encode_images(pv, pos)
        rows = compact_rows(feats, valid)
        n_first = int((tokens[0, :split] == IMG).sum())
        n_all = int((tokens == IMG).sum())
        L = tokens.shape[1]
        out = [model(tokens[:, :split], torch.arange(split), rows[:max(n_first, 1)])[0, -1],
               model(tokens[:, split:], torch.arange(split, L), rows[n_first:n_all])[0, -1]]
        for i, t in enumerate((7, 9)):
            out.append(model(torch.tensor([[t]]), torch.tensor([L + i]))[0, -1])
    return feats, rows, n_first, n_all, out


def test_exported_programs_match_eager(built):
    """The exported methods with FixedSlotFusion applied to prefill (the CPU lowering rewrites
    after it are checked through the .pte below) equal the eager model."""
    model = built["model"]
    fused, _ = apply_method_passes(built["raw"], {"prefill": multimodal_passes(model)})
    pv, pos, tokens = _inputs(model)
    split = 7  # inside the first image: the rows of each chunk are its own placeholders'
    feats, rows, n_first, n_all, ref = _eager_steps(model, pv, pos, tokens, split)
    enc = fused["image_encoder"].module()
    with torch.no_grad():
        for i in range(2):
            assert rel_max_err(enc(pv[i:i + 1], pos[i:i + 1]), feats[i]) <= RTOL
        run = ExportedBackend(fused, max_seq_len=SEQ)
        L = tokens.shape[1]
        no_audio = torch.zeros(1, 32)  # the prompt has no audio placeholder: the row is never read
        got = [run._prefill(tokens[:, :split], torch.arange(split), rows[:n_first], no_audio)[0, -1],
               run._prefill(tokens[:, split:], torch.arange(split, L), rows[n_first:n_all], no_audio)[0, -1]]
        for i, t in enumerate((7, 9)):
            got.append(run.decode(torch.tensor([[t]]), torch.tensor([L + i]))[0, -1])
    assert "aten.masked_scatter.default" not in _ops(fused["prefill"])
    errs = [rel_max_err(a, b) for a, b in zip(got, ref)]
    assert max(errs) <= RTOL, errs


def test_pte_matches_eager(built):
    model = built["model"]
    pv, pos, tokens = _inputs(model, seed=1)
    split = 12
    feats, rows, n_first, n_all, ref = _eager_steps(model, pv, pos, tokens, split)
    pte = open_pte(built["path"])
    assert pte.has_images and pte.multimodal["image_token_id"] == IMG and pte.multimodal["max_soft_tokens"] == SOFT
    for i in range(2):
        assert rel_max_err(pte.encode_image(pv[i], pos[i]), feats[i]) <= RTOL
    L = tokens.shape[1]
    got = [pte.prefill(tokens[:, :split], torch.arange(split), rows[:n_first])[0, -1],
           pte.prefill(tokens[:, split:], torch.arange(split, L), rows[n_first:n_all])[0, -1]]
    for i, t in enumerate((7, 9)):
        got.append(pte.decode(torch.tensor([[t]]), torch.tensor([L + i]))[0, -1])
    errs = [rel_max_err(a, b) for a, b in zip(got, ref)]
    assert max(errs) <= RTOL, errs


def test_pte_image_and_audio_generate_like_eager(built, tmp_path):
    """One .pte, both encoders: generate(images=, audio=) gives the eager model's prompt, prefill
    logits per chunk (<= 1e-4 relative) and greedy tokens."""
    from fxport.runtime.multimodal import build_prompt

    model = built["model"]
    png = _png(tmp_path / "x.png", 12, 20, 3)
    feats, fmask, _ = audio_inputs(built["audio_config"], torch.Generator().manual_seed(1), frames=17, valid=13)
    pte = open_pte(built["path"])
    eager = MultimodalEagerBackend(model, max_soft_tokens=SOFT, max_audio_frames=FRAMES)
    assert pte.has_audio and pte.multimodal["max_audio_frames"] == FRAMES
    pa = build_prompt(pte, [2, 5, 7], [png], (feats, fmask), bos_id=2)
    pb = build_prompt(eager, [2, 5, 7], [png], (feats, fmask), bos_id=2)
    assert pa.ids == pb.ids and len(pa.ids) > 8  # more than one prefill chunk of 8
    assert rel_max_err(pa.audio_rows, pb.audio_rows) <= RTOL and rel_max_err(pa.image_rows, pb.image_rows) <= RTOL
    model.reset_caches()
    errs = []
    for s, e in pb.chunks(8):
        la = pte.prefill(torch.tensor([pa.ids[s:e]]), torch.arange(s, e), **pa.features(s, e))[0, -1]
        lb = eager.prefill(torch.tensor([pb.ids[s:e]]), torch.arange(s, e), **pb.features(s, e))[0, -1]
        errs.append(rel_max_err(la, lb))
    assert max(errs) <= RTOL, errs
    a = generate(pte, None, [2, 5, 7], 5, images=[png], audio=(feats, fmask), max_prefill_chunk=8)
    b = generate(eager, None, [2, 5, 7], 5, images=[png], audio=(feats, fmask), max_prefill_chunk=8)
    assert a.prompt_tokens == b.prompt_tokens and a.tokens == b.tokens


def _png(path, h: int, w: int, seed: int):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


def test_fxport_run_image_end_to_end(built, tmp_path, capsys):
    """`fxport run tiny.pte --image a.png --image b.png --prompt-ids ...` generates the tokens
    the eager model generates from the same preprocessed images."""
    a, b = _png(tmp_path / "a.png", 30, 20, 0), _png(tmp_path / "b.png", 9, 21, 1)
    rc = main(["run", str(built["path"]), "--image", str(a), "--image", str(b), "--prompt-ids", "2,5,7,11",
               "--max-new-tokens", "5", "--no-stream", "--chunk", "8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    got = [int(t) for t in out.out.split()]
    eager = MultimodalEagerBackend(built["model"], max_soft_tokens=SOFT)
    ref = generate(eager, None, [2, 5, 7, 11], 5, images=[a, b], max_prefill_chunk=8)
    assert got == ref.tokens and len(got) == 5
    assert ref.prompt_tokens[:2] == [2, built["model"].config.boi_token_id]  # images right after BOS


def test_clear_errors(built, tmp_path, capsys):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG but not really")
    rc = main(["run", str(built["path"]), "--image", str(bad), "--prompt-ids", "2,5"])
    assert rc != 0 and "cannot read image" in capsys.readouterr().err
    png = _png(tmp_path / "ok.png", 16, 16, 2)
    eager = MultimodalEagerBackend(built["model"], max_soft_tokens=SOFT)
    with pytest.raises(ContextOverflowError, match=r"6 image\(s\) / audio take 36 of the 39 prompt tokens"):
        generate(eager, None, [2, 5, 7], 4, images=[png] * 6)
    text_only = Gemma4ForCausalLM(built["model"].config.text, max_seq_len=SEQ)
    with pytest.raises(MultimodalError, match="is a text-only program .* 1 image"):
        generate(text_only, None, [2, 5, 7], 2, images=[png])
    with pytest.raises(MultimodalError, match="prompt holds 2 image token"):
        generate(eager, None, [2, IMG, IMG], 2, images=[png])


def test_bidirectional_vision_program_matches_eager():
    """use_bidirectional_attention="vision": the exported prefill with FixedSlotFusion and
    RingBufferKVCache (ring smaller than the cache; the gathered mask keeps the image runs'
    both-way term) equals eager, a chunk holding whole images then decode steps."""
    from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache
    from fxport.models.gemma4.model import sliding_window_buffers

    text = hf_text_config(layer_types=(S, F), ple=0, window=6, bidir="vision")
    _, model = pair(hf_multimodal_config(text, hf_vision_config(pooling=2)), seed=9, max_seq_len=SEQ)
    with torch.no_grad():
        raw = export_methods(model, max_prefill_chunk=CHUNK, multimodal=True, max_soft_tokens=SOFT)
    ring = [RingBufferKVCache(windows=sliding_window_buffers(model), ring_size=6 + CHUNK - 1)]
    progs, _ = apply_method_passes(raw, {"prefill": multimodal_passes(model) + ring, "decode": list(ring)})
    pv, pos, tokens = _inputs(model, seed=3)
    split = 3  # the first chunk is BOS + text; the second holds both images
    _, rows, n_first, n_all, ref = _eager_steps(model, pv, pos, tokens, split)
    run = ExportedBackend(progs, max_seq_len=SEQ)
    L = tokens.shape[1]
    with torch.no_grad():
        got = [run._prefill(tokens[:, :split], torch.arange(split), rows[:1])[0, -1],
               run._prefill(tokens[:, split:], torch.arange(split, L), rows[:n_all])[0, -1]]
        for i, t in enumerate((7, 9)):
            got.append(run.decode(torch.tensor([[t]]), torch.tensor([L + i]))[0, -1])
    errs = [rel_max_err(a, b) for a, b in zip(got, ref)]
    assert max(errs) <= RTOL, errs
