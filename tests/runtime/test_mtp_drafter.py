"""The MTP drafter in the speculative loop (fxport.runtime.mtp): an eager tiny Gemma 4 target
(KV sharing, k_eq_v full layers, per-layer embeddings, window 4) with a random-weight drafter
built for it (with and without ordered embeddings). Drafts come from the drafter; greedy output
equals plain greedy decoding, past the window."""

from __future__ import annotations

import pytest
import torch

from fxport.models.gemma4.assistant import Gemma4AssistantForCausalLM, assistant_config_for
from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.runtime.generate import generate
from fxport.runtime.mtp import MtpDrafter
from fxport.runtime.samplers import Sampler

PROMPT = [2, 17, 40, 33, 9, 17, 40]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(get_preset("tiny"), max_seq_len=48).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if "norm" in name else 0.3)
    return model


def drafter_for(target, ordered: bool):
    torch.manual_seed(1)
    cfg = assistant_config_for(target.config, 32, 64, ordered=ordered, num_centroids=8, top_k=2)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text.vocab_size))
    return model


@pytest.mark.parametrize("ordered", [False, True], ids=["plain-head", "ordered-embeddings"])
def test_mtp_drafts_keep_greedy_output(target, ordered):
    plain = generate(target, None, PROMPT, 30).tokens
    drafter = MtpDrafter(target, drafter_for(target, ordered), k=3)
    calls = []
    propose = drafter.propose
    drafter.propose = lambda ctx, k: calls.append(propose(ctx, k)) or calls[-1]
    try:
        res = generate(target, None, PROMPT, 30, speculative=drafter)
    finally:
        drafter.close()
    assert res.tokens == plain
    s = res.speculative
    assert s.rounds > 5 and s.drafted == sum(len(d.tokens) for d in calls) > 15
    assert len(PROMPT) + 30 > 2 * target.config.sliding_window
    # sampling runs through the same drafter (q = one-hot: argmax drafts)
    drafter = MtpDrafter(target, drafter_for(target, ordered), k=3)
    try:
        sampled = generate(target, None, PROMPT, 12, sampler=Sampler(temperature=0.8, seed=0), speculative=drafter)
    finally:
        drafter.close()
    assert len(sampled.tokens) == 12 and sampled.speculative.rounds > 0


def test_mtp_drafter_for_another_target_is_refused(target):
    other = Gemma4AssistantForCausalLM(assistant_config_for(get_preset("tiny").replace(hidden_size=96), 32, 64))
    with pytest.raises(ValueError, match=r"built for a target of hidden size 96, this target has 64"):
        MtpDrafter(target, other)
