"""generate() refuses bad prompts before running: ids outside the vocabulary, a prompt longer than
the context, text that is not UTF-8. Messages exact."""

from __future__ import annotations

import os

import pytest
import torch

from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.runtime.generate import ContextOverflowError, TokenIdError, check_token_ids, generate


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Gemma4ForCausalLM(get_preset("tiny"), max_seq_len=16).eval()


class _Tok:
    """A tokenizer from another model: its ids run past the program's vocabulary."""

    vocab_size = 1000
    eos_ids = (1,)

    def __init__(self, ids):
        self.ids = ids

    def encode(self, text, add_bos=None):
        return list(self.ids)

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _called(backend_model):
    """Forward calls counted, to prove nothing ran."""
    calls = []
    backend_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_prompt_ids_outside_the_vocabulary(tiny):
    V = tiny.config.vocab_size
    calls = _called(tiny)
    for bad, pos in (([2, V, 3], 1), ([2, 3, -1], 2)):
        with pytest.raises(TokenIdError) as e:
            generate(tiny, None, bad, 3)
        assert str(e.value) == (f"generate: token id {bad[pos]} (prompt position {pos}) is outside the program's "
                                f"vocabulary of {V} ids (0..{V - 1}); pass token ids below {V}.")
    assert calls == []


def test_tokenizer_of_another_model(tiny):
    V = tiny.config.vocab_size
    with pytest.raises(TokenIdError) as e:
        generate(tiny, _Tok([2, V + 7]), "hello", 3)
    assert str(e.value) == (
        f"generate: token id {V + 7} (prompt position 1) is outside the program's vocabulary of {V} ids "
        f"(0..{V - 1}); the tokenizer does not belong to this program (it has 1000 ids): use the tokenizer the "
        "program was exported with (--tokenizer FILE.gguf|DIR, or re-export to write MODEL.tokenizer/ beside "
        "the program).")


def test_in_range_ids_still_generate(tiny):
    V = tiny.config.vocab_size
    assert len(generate(tiny, None, [0, V - 1], 2).tokens) == 2
    check_token_ids(torch.tensor([[0, V - 1]]), V)
    check_token_ids([10**9], None)  # unknown vocabulary: not checked


def test_prompt_longer_than_the_context_suggests_a_working_fix(tiny):
    with pytest.raises(ContextOverflowError) as e:
        generate(tiny, None, [2] * 20, 5)
    assert str(e.value) == (
        "generate: prompt of 20 tokens does not fit the program's context of max_seq_len=16 positions; shorten "
        "the prompt to fewer than 16 tokens (to leave room for new ones), or re-export with a larger context "
        "(fxport export --max-seq-len 24).")
    # a prompt that fits with too many new tokens still suggests a max_new_tokens that is >= 1
    with pytest.raises(ContextOverflowError, match="lower max_new_tokens to 3, or export with a larger max_seq_len"):
        generate(tiny, None, [2] * 14, 5)


def test_prompt_that_is_not_utf8(tiny):
    with pytest.raises(ValueError) as e:
        generate(tiny, _Tok([2]), os.fsdecode(b"na\xefve"), 2)
    assert str(e.value) == ("generate: the prompt is not valid UTF-8 (byte 0xef at character 2); pass UTF-8 text "
                            "(check the terminal's encoding) or token ids (--prompt-ids).")


def test_eager_backend_knows_its_vocabulary(tiny):
    from fxport.runtime.generate import EagerBackend

    assert EagerBackend(tiny).vocab_size == tiny.config.vocab_size == 256
