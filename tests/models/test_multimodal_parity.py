"""Eager multimodal Gemma 4 vs transformers 5.23's Gemma4ForConditionalGeneration (fp32).

Tolerance: relative max error (max |ours - hf| / max |hf|) <= 1e-4 on the logits, for the
prefill and for one decode step after it. Weights are random (norm weights away from 1, finite
clip bounds); inputs are built by hand as the HF processor lays them out.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.models.gemma4.vision import compact_rows

from fxport.tests.models.multimodal_helpers import (
    AUD,
    F,
    IMG,
    S,
    TEXT_MAX,
    audio_hf_config,
    audio_inputs,
    hf_multimodal_config,
    hf_text_config,
    hf_vision_config,
    image_inputs,
    mm_token_type_ids,
    pair,
    prompt_with_audio,
    prompt_with_images,
    rel_max_err,
)

RTOL = 1e-4  # relative max error, fp32 logits


def _check(hf, ours, tokens, pv=None, pos=None, feats=None, fmask=None) -> tuple[float, float]:
    """(prefill, decode) relative max errors of ours vs transformers; asserts both <= RTOL."""
    L = tokens.shape[1]
    with torch.no_grad():
        kw = {} if pv is None else dict(pixel_values=pv, image_position_ids=pos)
        if feats is not None:
            kw.update(input_features=feats, input_features_mask=fmask)
        out = hf(input_ids=tokens, mm_token_type_ids=mm_token_type_ids(tokens), use_cache=True,
                 output_hidden_states=True, **kw)
        got = ours.generate_step(tokens, torch.arange(L), pv, pos, feats, fmask)
        e1 = rel_max_err(got, out.logits)
        nxt = torch.tensor([[int(out.logits[0, -1].argmax()) % (TEXT_MAX + 1)]])
        ref2 = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True,
                  output_hidden_states=True).logits
        e2 = rel_max_err(ours(nxt, torch.tensor([L])), ref2)
    assert e1 <= RTOL, f"prefill logits: relative max error {e1:.2e} > {RTOL}"
    assert e2 <= RTOL, f"decode logits: relative max error {e2:.2e} > {RTOL}"
    return e1, e2


@st.composite
def knobs(draw) -> dict:
    k = draw(st.sampled_from([2, 3]))  # transformers mislabels padding when k == 1 (no pooling)
    max_soft = draw(st.sampled_from([4, 6]))
    return dict(
        pooling=k,
        max_soft=max_soft,
        vis_layers=draw(st.integers(1, 2)),
        kv_heads=draw(st.sampled_from([1, 2])),
        clipped=draw(st.booleans()),
        standardize=draw(st.booleans()),
        ple=draw(st.sampled_from([0, 4])),
        window=draw(st.integers(2, 8)),
        bidir=draw(st.sampled_from([None, "vision"])),
        layer_types=draw(st.sampled_from([(S, F), (S, S, F), (F, S, F)])),
        seed=draw(st.integers(0, 2**16)),
    )


def _grid(draw_rows: int, draw_cols: int, k: int, max_soft: int) -> tuple[int, int]:
    """(rows, cols) in patches, multiples of k, at most max_soft pooled cells."""
    rows = max(1, min(draw_rows, max_soft))
    cols = max(1, min(draw_cols, max_soft // rows))
    return rows * k, cols * k


def _models(d: dict):
    vis = hf_vision_config(layers=d["vis_layers"], kv_heads=d["kv_heads"], pooling=d["pooling"],
                           clipped=d["clipped"], standardize=d["standardize"])
    text = hf_text_config(layer_types=d["layer_types"], ple=d["ple"], window=d["window"], bidir=d["bidir"])
    return pair(hf_multimodal_config(text, vis), d["seed"])


@settings(max_examples=6, deadline=None)
@given(d=knobs(), rows=st.integers(1, 3), cols=st.integers(1, 3))
def test_one_image_with_padded_patches(d, rows, cols):
    hf, ours = _models(d)
    k, max_soft = d["pooling"], d["max_soft"]
    grid = _grid(rows, cols, k, max_soft - 1)  # at least one pooled cell of padding
    g = torch.Generator().manual_seed(d["seed"])
    pv, pos = image_inputs([grid], patch=2, max_patches=max_soft * k * k, g=g)
    n = grid[0] * grid[1] // (k * k)
    tokens = prompt_with_images(ours.config, [n], g)
    _check(hf, ours, tokens, pv, pos)


@settings(max_examples=5, deadline=None)
@given(d=knobs(), a=st.tuples(st.integers(1, 3), st.integers(1, 3)), b=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_two_images_of_different_sizes(d, a, b):
    hf, ours = _models(d)
    k, max_soft = d["pooling"], d["max_soft"]
    ga, gb = _grid(*a, k, max_soft), _grid(*b, k, max_soft)
    if ga == gb:  # different sizes
        gb = (k, k) if ga != (k, k) else (k, 2 * k)
    g = torch.Generator().manual_seed(d["seed"])
    pv, pos = image_inputs([ga, gb], patch=2, max_patches=max_soft * k * k, g=g)
    ns = [ga[0] * ga[1] // (k * k), gb[0] * gb[1] // (k * k)]
    tokens = prompt_with_images(ours.config, ns, g)
    _check(hf, ours, tokens, pv, pos)


@pytest.mark.parametrize("bidir", [None, "vision"])
def test_text_only(bidir):
    d = dict(pooling=2, max_soft=4, vis_layers=1, kv_heads=2, clipped=False, standardize=False, ple=4,
             window=3, bidir=bidir, layer_types=(S, F), seed=11)
    hf, ours = _models(d)
    tokens = torch.randint(3, TEXT_MAX + 1, (1, 9), generator=torch.Generator().manual_seed(1))
    tokens[0, 0] = 2
    _check(hf, ours, tokens)


@pytest.mark.parametrize("bidir", [None, "vision"])
def test_bidirectional_vision_attention_both_settings(bidir):
    """Two 2x2-cell images with a window wider than a run: with "vision", image tokens see the
    later tokens of their own run in sliding layers, which changes the logits (checked)."""
    d = dict(pooling=2, max_soft=4, vis_layers=1, kv_heads=2, clipped=True, standardize=True, ple=4,
             window=8, bidir=bidir, layer_types=(S, S, F), seed=5)
    hf, ours = _models(d)
    g = torch.Generator().manual_seed(3)
    pv, pos = image_inputs([(4, 4), (2, 4)], patch=2, max_patches=16, g=g)
    tokens = prompt_with_images(ours.config, [4, 2], g)
    _check(hf, ours, tokens, pv, pos)
    with torch.no_grad():
        ours.reset_caches()
        mine = ours.generate_step(tokens, torch.arange(tokens.shape[1]), pv, pos)
        ours.config.text.use_bidirectional_attention = "vision" if bidir is None else None
        ours.reset_caches()
        other = ours.generate_step(tokens, torch.arange(tokens.shape[1]), pv, pos)
    assert rel_max_err(mine, other) > 1e-3  # the setting matters for this prompt


def test_padded_cells_are_dropped_by_masks_not_indexing():
    """encode_images keeps every slot (static shape); the valid ones are the first n of each
    image and compact_rows equals transformers' boolean-index compaction exactly."""
    d = dict(pooling=2, max_soft=6, vis_layers=1, kv_heads=1, clipped=False, standardize=True, ple=0,
             window=3, bidir=None, layer_types=(S, F), seed=2)
    hf, ours = _models(d)
    g = torch.Generator().manual_seed(0)
    pv, pos = image_inputs([(2, 4), (4, 2), (2, 2)], patch=2, max_patches=24, g=g)
    with torch.no_grad():
        feats, valid = ours.encode_images(pv, pos)
        ref = torch.cat(hf.model.get_image_features(pv, pos).pooler_output)  # (sum n, H)
    assert feats.shape == (3, 6, 32)
    assert valid.tolist() == [[True] * 2 + [False] * 4, [True] * 2 + [False] * 4, [True] + [False] * 5]
    compact = compact_rows(feats, valid)
    assert compact.shape == (18, 32) and torch.equal(compact[5:], torch.zeros(13, 32))
    assert rel_max_err(compact[:5], ref) <= RTOL
    assert torch.equal(compact[:5], feats[valid])  # the selection matrix is exact


def test_hf_state_dict_names_and_config():
    d = dict(pooling=2, max_soft=4, vis_layers=2, kv_heads=1, clipped=True, standardize=True, ple=4,
             window=3, bidir="vision", layer_types=(S, F), seed=1)
    hf, ours = _models(d)  # strict=True load inside
    cfg = ours.config
    assert (cfg.image_token_id, cfg.audio_token_id, cfg.text.use_bidirectional_attention) == (IMG, AUD, "vision")
    assert cfg.vision.pooling_kernel_size == 2 and cfg.vision.use_clipped_linears and cfg.vision.standardize
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert set(ours.state_dict()) == set(hf.state_dict())


# ---- audio ------------------------------------------------------------------------------

@settings(max_examples=4, deadline=None)
@given(frames=st.integers(5, 30), pad=st.integers(0, 12), clipped=st.booleans(), with_vision=st.booleans(),
       ple=st.sampled_from([0, 4]), seed=st.integers(0, 2**16))
def test_audio_and_text_then_decode(frames, pad, clipped, with_vision, ple, seed):
    """One right-padded clip: ``boa + audio * n + eoa`` with n from the mask after the two
    stride-2 subsamplings; prefill and one decode step vs transformers (with or without a
    vision tower alongside)."""
    vis = hf_vision_config() if with_vision else None
    text = hf_text_config(ple=ple)
    hf, ours = pair(hf_multimodal_config(text, vis, audio=audio_hf_config(clipped=clipped)), seed)
    g = torch.Generator().manual_seed(seed)
    feats, fmask, n = audio_inputs(hf.config.audio_config, g, frames=frames,
                                   valid=max(1, frames - pad))
    tokens = prompt_with_audio(ours.config, n, g)
    assert int((tokens == AUD).sum()) == n
    _check(hf, ours, tokens, feats=feats, fmask=fmask)


def test_audio_and_image_in_one_prompt():
    """An image and an audio clip in the same prompt: both merges on their own placeholder ids."""
    hf, ours = pair(hf_multimodal_config(hf_text_config(), hf_vision_config(), audio=audio_hf_config()), 7)
    g = torch.Generator().manual_seed(7)
    pv, pos = image_inputs([(2, 4)], patch=2, max_patches=16, g=g)
    feats, fmask, n = audio_inputs(hf.config.audio_config, g, frames=17, valid=13)
    img = prompt_with_images(ours.config, [2], g)
    aud = prompt_with_audio(ours.config, n, g)
    tokens = torch.cat([img, aud[:, 1:]], dim=1)
    _check(hf, ours, tokens, pv, pos, feats, fmask)
    with torch.no_grad():  # the clip's features reach the logits
        ours.reset_caches()
        a = ours.generate_step(tokens, torch.arange(tokens.shape[1]), pv, pos, feats, fmask)
        ours.reset_caches()
        b = ours.generate_step(tokens, torch.arange(tokens.shape[1]), pv, pos,
                               feats + torch.randn(feats.shape, generator=g) * fmask[..., None], fmask)
    assert rel_max_err(a, b) > 1e-3


def test_load_hf_directory(tmp_path):
    """save_pretrained of a tiny transformers model loads back equal (tied lm_head absent)."""
    from fxport.models.gemma4.multimodal import load_hf_multimodal

    d = dict(pooling=2, max_soft=4, vis_layers=1, kv_heads=1, clipped=True, standardize=True, ple=4,
             window=3, bidir=None, layer_types=(S, F), seed=3)
    hf, ours = _models(d)
    hf.save_pretrained(tmp_path)
    loaded = load_hf_multimodal(tmp_path, max_seq_len=64)
    ref, got = ours.state_dict(), loaded.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert loaded.config == ours.config


def test_generate_with_images_and_audio_matches_one_step_forward(tmp_path):
    """generate(images=[...], audio=(features, mask)) lays out boi/img/eoi then boa/aud/eoa after
    BOS, prefills in chunks with each chunk's own feature rows, and its first token equals the
    argmax of one full-prompt eager forward (generate_step) on the same inputs."""
    import numpy as np
    from PIL import Image

    from fxport.runtime.generate import generate
    from fxport.runtime.image import preprocess_image
    from fxport.runtime.multimodal import MultimodalEagerBackend

    from fxport.tests.models.multimodal_helpers import AUD, BOA, BOI, EOA, EOI

    hf, ours = pair(hf_multimodal_config(hf_text_config(), hf_vision_config(), audio=audio_hf_config()), 12)
    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB").save(png)
    g = torch.Generator().manual_seed(1)
    feats, fmask, n_aud = audio_inputs(hf.config.audio_config, g, frames=17, valid=13)
    be = MultimodalEagerBackend(ours, max_soft_tokens=4)
    res = generate(be, None, [2, 5, 7], 2, images=[png], audio=(feats, fmask), max_prefill_chunk=5)
    img = preprocess_image(png, 2, 2, 4)
    n_img = img.num_soft_tokens
    want = [2, BOI] + [IMG] * n_img + [EOI, BOA] + [AUD] * n_aud + [EOA, 5, 7]
    assert res.prompt_tokens == want and res.prefill_chunks >= 3
    ids = torch.tensor([want])
    with torch.no_grad():
        ours.reset_caches()
        logits = ours.generate_step(ids, torch.arange(ids.shape[1]), img.pixel_values[None],
                                    img.position_ids[None], feats, fmask)
    assert res.tokens[0] == int(logits[0, -1].argmax())
