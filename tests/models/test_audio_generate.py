"""``generate(model, ..., audio=...)`` end to end on a tiny eager multimodal Gemma 4 with audio.

Reference: transformers' Gemma4ForConditionalGeneration run greedily by hand (full-sequence
forward per step, no cache) on the prompt that ``generate`` laid out, with the same
``input_features`` / ``input_features_mask``. Pass criterion: the same greedy tokens (exact), and
the layout ``boa + audio_token * n + eoa`` with n equal to the HF processor's count.
"""

from __future__ import annotations

import torch

from fxport.runtime.generate import generate

from fxport.tests.models.multimodal_helpers import AUD, BOA, EOA, audio_hf_config, hf_multimodal_config, hf_text_config, mm_token_type_ids, pair

STEPS = 4


def _hf_greedy(hf, ids: list[int], feats, mask, steps: int) -> list[int]:
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            t = torch.tensor([seq])
            logits = hf(input_ids=t, mm_token_type_ids=mm_token_type_ids(t), input_features=feats,
                        input_features_mask=mask).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def test_generate_with_precomputed_features_matches_transformers():
    hf, ours = pair(hf_multimodal_config(hf_text_config(), None, audio=audio_hf_config()), 21)
    g = torch.Generator().manual_seed(21)
    T, valid = 23, 18
    mask = (torch.arange(T) < valid)[None]
    feats = torch.randn(1, T, 8, generator=g) * mask[..., None]  # the extractor's output shape (1, T, n_mels)
    n = int(mask[:, ::2][:, ::2].sum())
    text = [5, 17, 33]
    res = generate(ours, None, text, max_new_tokens=STEPS, audio={"input_features": feats, "input_features_mask": mask})
    ids = res.prompt_tokens
    assert sorted(ids) == sorted(text + [BOA, EOA] + [AUD] * n)
    start = ids.index(BOA)
    assert ids[start:start + n + 2] == [BOA] + [AUD] * n + [EOA]
    ref = _hf_greedy(hf, ids, feats, mask, STEPS)
    assert res.tokens == ref
    assert not {AUD, BOA, EOA} & set(ref)  # a placeholder fed back would not be text


def test_audio_changes_what_is_generated():
    """The same prompt with two different clips of the same length: the logits of the first
    generated token differ (the audio reaches the decoder through generate)."""
    hf, ours = pair(hf_multimodal_config(hf_text_config(), None, audio=audio_hf_config()), 22)
    g = torch.Generator().manual_seed(22)
    mask = torch.ones(1, 17, dtype=torch.bool)
    a, b = torch.randn(1, 17, 8, generator=g), torch.randn(1, 17, 8, generator=g)
    seen = []
    for feats in (a, b):
        logits = []
        generate(ours, None, [5, 6], max_new_tokens=1, audio=(feats, mask),
                 sampler=lambda x: (logits.append(x), x.argmax(-1))[1])
        seen.append(logits[0])
    assert (seen[0] - seen[1]).abs().max() / seen[0].abs().max() > 1e-3
