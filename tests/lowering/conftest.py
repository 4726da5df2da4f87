"""Tiny Gemma model shared by the lowering and CLI tests (2 layers: one sliding, one full)."""

from __future__ import annotations

import pytest
import torch

from fxport.models.gemma4.config import FULL, SLIDING, get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM

MAX_SEQ_LEN = 16
MAX_CHUNK = 5  # ring size 2 * window = 8 >= window + chunk - 1


def tiny_config():
    return get_preset("tiny-gemma3").replace(num_hidden_layers=2, layer_types=[SLIDING, FULL])


def tiny_model(seed: int = 0) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(tiny_config(), max_seq_len=MAX_SEQ_LEN).eval()
    with torch.no_grad():  # random norms too, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    return model


def tiny_metadata() -> dict:
    """The runner-contract constant methods of a tiny program (chunk 5, 16 positions)."""
    from fxport.contract import runner_metadata

    return runner_metadata(max_prefill_chunk=MAX_CHUNK, max_context_len=MAX_SEQ_LEN, eos_ids=[1], vocab_size=256,
                           bos_id=2)


class Tiny:
    """What the tests get from the ``tiny`` fixture."""

    max_seq_len = MAX_SEQ_LEN
    max_chunk = MAX_CHUNK
    config = staticmethod(tiny_config)
    model = staticmethod(tiny_model)
    metadata = staticmethod(tiny_metadata)


@pytest.fixture(scope="session")
def tiny():
    return Tiny
