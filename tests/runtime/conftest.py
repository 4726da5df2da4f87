"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of thousands of tiny tensor ops (threads spinning on a loaded
    machine cost 5-10x: ~35 us a speculative round instead of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
