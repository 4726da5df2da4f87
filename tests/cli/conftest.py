"""One exported program shared by the CLI test modules (an export costs tens of seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_pte(tmp_path_factory):
    """``fxport export`` of a 1-layer tiny-gemma3 (random weights, seed 0, vocabulary 256), 8da4w,
    max_seq_len 16, prefill chunks of up to 5 tokens."""
    from fxport.cli import main

    out = tmp_path_factory.mktemp("cli") / "tiny.pte"
    argv = ["export", "--preset", "tiny-gemma3", "--layers", "1", "--quant", "8da4w", "--max-seq-len", "16",
            "--max-prefill-chunk", "5", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out
