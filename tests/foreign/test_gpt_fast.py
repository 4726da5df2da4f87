"""RingBufferKVCache + SDPADispatch on a gpt-fast-style model (examples/gpt_fast.py, gpt-fast's layout).

gpt-fast (pytorch-labs/gpt-fast) writes its cache with ``k_cache[:, :, input_pos] = k`` (an
``index_put_`` with a position tensor, as torchtune does), builds the mask as
``causal_mask[None, None, input_pos]`` and expands GQA heads with
``k.repeat_interleave(n_head // n_local_heads, dim=1)`` in front of
``F.scaled_dot_product_attention``. The same model also writes its cache the other common way,
``cache.narrow(2, start, L).copy_(k)`` with ``start = input_pos[0].item()`` (``slice_scatter`` at
a symbolic start in the exported graph). Layer 0 is a sliding layer (a banded mask buffer),
layer 1 global. Hypothesis draws heads, KV heads, head dim, window and prefill chunk.
Reference: the same exported programs without the passes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.export import Dim

from fxport.examples.gpt_fast import ModelArgs, Transformer
from fxport.passes import RingBufferKVCache, SDPADispatch, apply
from fxport.tests.foreign import drive

VOCAB, DIM, S = 64, 32, 32


def gpt_fast(n_head: int, n_local_heads: int, head_dim: int, window: int, write: str = "index_put") -> Transformer:
    """Two layers: 0 sliding (window ``window``), 1 global; S positions."""
    args = ModelArgs(n_layer=2, max_seq_length=S, window=window, vocab_size=VOCAB, dim=DIM, n_head=n_head,
                     n_local_heads=n_local_heads, head_dim=head_dim, cache_write=write)
    return Transformer(args).eval()


def export(model, chunk: int) -> dict:
    L = Dim("L", min=1, max=chunk)
    with torch.no_grad():
        prefill = torch.export.export(model, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                      dynamic_shapes=({1: L}, {0: L}), strict=False)
        decode = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.arange(1)), strict=False)
    return {"prefill": prefill, "decode": decode}


def feed(method, tokens, start):
    return (tokens, torch.arange(start, start + tokens.shape[1])), {}


@pytest.mark.parametrize("write", ["index_put", "narrow_copy"])
@settings(max_examples=2, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # no shrinking: each example exports twice
@given(
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3), (8, 2)]),  # (n_head, n_local_heads)
    head_dim=st.sampled_from([4, 8, 16]),
    window=st.integers(2, 6),
    chunk=st.integers(2, 9),
    data=st.data(),
)
def test_cache_write_forms_ring_and_splitk(write, heads, head_dim, window, chunk, data):
    n_head, n_kv = heads
    chunks = data.draw(st.lists(st.integers(1, chunk), min_size=1, max_size=3), label="chunks")
    torch.manual_seed(0)
    model = gpt_fast(n_head, n_kv, head_dim, window, write)
    reference = {m: drive.normalized(ep) for m, ep in export(model, chunk).items()}
    sliding = [f"layers.0.attention.kv_cache.{kv}_cache" for kv in ("k", "v")]
    full = [f"layers.1.attention.kv_cache.{kv}_cache" for kv in ("k", "v")]
    passes = [RingBufferKVCache({n: window for n in sliding}), SDPADispatch(threshold=0)]
    results = {m: apply(ep, passes, method=m, dump=False) for m, ep in reference.items()}

    r = drive.ring_size(window, chunk)
    for method, res in results.items():
        ring = res["ring_buffer_kv_cache"].stats
        assert (ring.matched, ring.rewritten, dict(ring.skipped)) == (2, 2, {}), (method, res.summary())
        assert [(site["write"], site["readers"]) for site in ring.sites] == \
            [({"index_put": "index_put", "narrow_copy": "slice_scatter"}[write], ["repeat_interleave"])] * 2
        assert drive.cache_lengths(res.ep, sliding + full) == {**dict.fromkeys(sliding, r), **dict.fromkeys(full, S)}
        assert drive.aten_sdpa_left(res.ep) == 0, method
    decode = results["decode"].ep
    assert drive.splitk_reads(decode, sliding + full) == [
        {"q": (1, n_head, 1, head_dim), "k": (1, n_kv, length, head_dim), "v": (1, n_kv, length, head_dim),
         "k_cache": names[0], "v_cache": names[1]}
        for names, length in ((sliding, r), (full, S))
    ]
    assert drive.kv_expansions(decode, sliding + full) == []

    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    expected = drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, chunks)
    with torch.no_grad():  # the unrewritten programs equal the eager model run once over all S tokens
        for layer in model.layers:
            layer.attention.kv_cache.k_cache.zero_(), layer.attention.kv_cache.v_cache.zero_()
        eager = model(tokens, torch.arange(S))
    torch.testing.assert_close(torch.cat(expected, 1), eager, rtol=1e-5, atol=1e-5)
