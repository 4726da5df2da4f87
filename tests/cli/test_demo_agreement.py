"""teacher_forced_agreement: the demo's comparison of a program's greedy tokens with an eager model."""

import torch

from fxport.demo import teacher_forced_agreement
from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.runtime.generate import generate


def _model():
    torch.manual_seed(0)
    return Gemma4ForCausalLM(get_preset("tiny-gemma3"), max_seq_len=32).eval()


def test_own_greedy_tokens_agree_everywhere():
    model = _model()
    prompt = [2, 5, 7, 11]
    res = generate(model, None, prompt, 8)
    got = teacher_forced_agreement(model, prompt, res.tokens)
    assert got["eager"] == res.tokens
    n = len(res.tokens)
    assert n >= 4
    assert (got["prefix_match"], got["agree"], got["steps"]) == (n, n, n)
    assert got["max_gap"] <= 1e-4  # batched vs step-wise fp32 summation order only


def test_a_changed_token_is_found_and_scored():
    model = _model()
    prompt = [2, 5, 7, 11]
    tokens = generate(model, None, prompt, 8).tokens
    bad = list(tokens)
    bad[3] = (tokens[3] + 1) % model.config.vocab_size
    got = teacher_forced_agreement(model, prompt, bad)
    assert got["prefix_match"] == 3
    assert got["eager"][3] == tokens[3]  # the same prefix gives the same eager choice
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:3]]), torch.arange(len(prompt) + 3))[0, -1]
    gap = (logits.max() - logits[bad[3]]).item()
    assert gap > 0
    assert got["max_gap"] >= gap - 1e-4  # the largest gap over all steps
