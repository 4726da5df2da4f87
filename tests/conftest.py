"""The fixtures every test directory shares (the one conftest of the test tree).

Test helpers are modules beside the tests that use them (``tests/passes/hypothesis_helpers.py``,
``tests/foreign/drive.py``, ``tests/models/tiny_gguf.py`` ...), imported one way, by their
package path, as fxport's own modules are::

    from fxport.tests.passes.hypothesis_helpers import run_pass
    from fxport.examples.gpt_fast import Transformer   # an example's model, tested as written

(``fxport`` is the repository root, so ``fxport.tests`` / ``fxport.examples`` resolve without
``sys.path`` edits; pytest runs in importlib mode, so test modules never import each other.)

Fixtures:
  * ``tiny``: the tiny Gemma 3-style model (2 layers: one sliding, one full; 16 positions,
    prefill chunks up to 5) with its config and runner metadata;
  * ``tiny_pte``: ``fxport export`` of a 1-layer tiny model to a .pte (one per session);
  * ``one_thread``: one intra-op thread for the duration of a test.
"""

from __future__ import annotations

import pytest
import torch

MAX_SEQ_LEN = 16
MAX_CHUNK = 5  # ring size 2 * window = 8 >= window + chunk - 1


def tiny_config():
    from fxport.models.gemma4.config import FULL, SLIDING, get_preset

    return get_preset("tiny-gemma3").replace(num_hidden_layers=2, layer_types=[SLIDING, FULL])


def tiny_model(seed: int = 0):
    """A :class:`~fxport.models.gemma4.model.Gemma4ForCausalLM` of :func:`tiny_config`, random
    weights from ``seed`` (norms too, so every weight matters)."""
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(tiny_config(), max_seq_len=MAX_SEQ_LEN).eval()
    with torch.no_grad():
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


@pytest.fixture(scope="session")
def tiny_pte(tmp_path_factory):
    """``fxport export`` of a 1-layer tiny-gemma3 (random weights, seed 0, vocabulary 256), 8da4w,
    max_seq_len 16, prefill chunks of up to 5 tokens (an export costs tens of seconds: one per
    session, shared by the CLI tests)."""
    from fxport.cli import main

    out = tmp_path_factory.mktemp("cli") / "tiny.pte"
    argv = ["export", "--preset", "tiny-gemma3", "--layers", "1", "--quant", "8da4w", "--max-seq-len", "16",
            "--max-prefill-chunk", "5", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of thousands of tiny tensor ops (threads spinning on a loaded
    machine cost 5-10x: ~35 us a speculative round instead of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
