"""torch's ops stay on the calling thread while a .pte backend decodes (runtime/pte_backend.py).

torch's OpenMP workers spin for milliseconds after a parallel op and take a core from
ExecuTorch's threadpool; the backend and the generate loop run torch's ops on one thread
around the method calls and the sampling. These tests check where the thread count is 1 and
that the caller's setting comes back, whatever happens inside.
"""

from __future__ import annotations

import pytest
import torch

from fxport.runtime.generate import generate
from fxport.runtime.pte_backend import torch_ops_inline


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_inline_inside_and_restored_after(three_threads):
    with torch_ops_inline():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


def test_restored_after_an_exception(three_threads):
    with pytest.raises(KeyError):
        with torch_ops_inline():
            raise KeyError("inside")
    assert torch.get_num_threads() == 3


def test_nested_blocks_keep_one_thread(three_threads):
    with torch_ops_inline():
        with torch_ops_inline():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


class _RecordingBackend:
    """A backend with a step_context, recording torch's thread count at every call."""

    max_seq_len, max_prefill_chunk, vocab_size = 64, 8, 16

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def step_context(self):
        return torch_ops_inline()

    def prefill(self, tokens, input_pos):
        self.seen.append(("prefill", torch.get_num_threads()))
        return torch.zeros(1, 1, self.vocab_size)

    def decode(self, token, input_pos):
        self.seen.append(("decode", torch.get_num_threads()))
        logits = torch.zeros(1, 1, self.vocab_size)
        logits[..., (int(token) + 1) % self.vocab_size] = 1.0  # next id = this id + 1
        return logits


def test_generate_samples_and_decodes_inside_step_context(three_threads):
    backend = _RecordingBackend()
    threads_in_sampler = []

    def sampler(logits):
        threads_in_sampler.append(torch.get_num_threads())
        return torch.argmax(logits, dim=-1)

    out = generate(backend, None, [1, 2, 3], max_new_tokens=5, sampler=sampler)
    assert out.tokens == [0, 1, 2, 3, 4]
    assert backend.seen == [("prefill", 3)] + [("decode", 1)] * 4  # prefill outside, decode steps inside
    assert threads_in_sampler == [1] * 5  # the first id (from prefill's logits) is sampled inside too
    assert torch.get_num_threads() == 3


def test_one_openmp_level_sets_and_restores_libgomps_process_wide_levels():
    """``one_openmp_level`` (held by torch_ops_inline and the stock runners' generate): libgomp's
    max-active-levels is 0 inside, for every thread, and back to its value after, also on error."""
    import threading

    from fxport.runtime.pte_backend import _libgomp, one_openmp_level

    gomp = _libgomp()
    assert gomp is not None  # torch's CPU wheel ships libgomp.so.1
    before = gomp.omp_get_max_active_levels()
    assert before >= 1
    seen = []
    with pytest.raises(RuntimeError, match="inside"):
        with one_openmp_level():
            seen.append(gomp.omp_get_max_active_levels())
            t = threading.Thread(target=lambda: seen.append(gomp.omp_get_max_active_levels()))
            t.start()
            t.join()
            raise RuntimeError("inside")
    assert seen == [0, 0]  # the calling thread and another thread
    assert gomp.omp_get_max_active_levels() == before
