"""RingBufferKVCache + SDPADispatch on ExecuTorch's own Llama example (the executorch wheel).

``executorch.examples.models.llama``: ``construct_transformer(ModelArgs(use_kv_cache=True,
enable_dynamic_shape=True))``, exported as ``export_llama`` does (tokens with a dynamic length,
``{"input_pos": tensor([start])}``). Its caches are ``layers.{i}.attention.kv_cache.{k,v}_cache``
written with ``index_copy_(2, arange(L) + input_pos[0].item(), k)``; its mask is the bool buffer
``layers.{i}.attention.mask`` narrowed at the start position. Layer 0 is made a sliding layer
by a banded mask (causal, window W), as the example has no sliding-window option of its own
outside its hand-written ring caches. GQA spellings:

* ``repeat_interleave``: ExecuTorch's ``SDPA`` module as shipped, ``k.repeat_interleave(n_rep, 1)``;
* ``enable_gqa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the cache;
* ``repeat_kv``: transformers' ``unsqueeze -> expand -> reshape`` chain.

The last two replace the example's ``SDPA`` module the way its own source transformations
(``replace_sdpa_with_*``) do. Reference: the same exported programs without the passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch, apply
from fxport.tests.foreign import drive

pytest.importorskip("executorch")

from executorch.examples.models.llama.llama_transformer import construct_transformer  # noqa: E402
from executorch.examples.models.llama.model_args import ModelArgs  # noqa: E402

MAX_CONTEXT = 32


class GQASDPA(torch.nn.Module):
    """Drop-in for the example's ``SDPA`` module with another GQA spelling."""

    def __init__(self, dim: int, n_rep: int, spelling: str):
        super().__init__()
        self.dim, self.n_rep, self.spelling = dim, n_rep, spelling

    def forward(self, input_pos, q, k, v, bsz, seqlen, mask):
        if self.spelling == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:  # transformers' repeat_kv
            b, h, s, d = k.shape
            k = k[:, :, None].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)
            v = v[:, :, None].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(bsz, seqlen, self.dim)


def build(n_heads: int, n_kv_heads: int, head_dim: int, window: int, spelling: str):
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=64,
        vocab_size=64, max_seq_len=MAX_CONTEXT, max_context_len=MAX_CONTEXT, use_kv_cache=True,
        enable_dynamic_shape=True,
    )
    model = construct_transformer(args).eval()
    causal = torch.tril(torch.ones(MAX_CONTEXT, MAX_CONTEXT, dtype=torch.bool))
    model.layers[0].attention.mask.copy_(causal & ~torch.tril(causal, -window))  # keys p-W+1..p
    if spelling != "repeat_interleave":
        for layer in model.layers:
            att = layer.attention
            att.SDPA = GQASDPA(att.n_local_heads * att.head_dim, att.n_rep, spelling)
    return model


def export(model, chunk: int) -> dict:
    """prefill: tokens (1, L), L in 1..chunk; decode: tokens (1, 1). As export_llama does."""
    pos = {"input_pos": torch.tensor([0])}
    dims = ({1: Dim("L", min=1, max=chunk)}, {"input_pos": None})
    with torch.no_grad():
        prefill = torch.export.export(model, (torch.zeros(1, 2, dtype=torch.long), pos), dynamic_shapes=dims, strict=False)
        decode = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), pos), strict=False)
    return {"prefill": prefill, "decode": decode}


def feed(method, tokens, start):
    return (tokens, {"input_pos": torch.tensor([start])}), {}


def cache_names(i: int) -> list[str]:
    return [f"layers.{i}.attention.kv_cache.{kv}_cache" for kv in ("k", "v")]


def check(spelling: str, n_heads: int, n_kv_heads: int, head_dim: int, window: int, chunk: int, chunks: list[int]):
    reference = {m: drive.normalized(ep) for m, ep in export(build(n_heads, n_kv_heads, head_dim, window, spelling), chunk).items()}
    sliding, full = cache_names(0), cache_names(1)
    passes = [RingBufferKVCache({n: window for n in sliding}), SDPADispatch(threshold=0)]
    results = {m: apply(ep, passes, method=m, dump=False) for m, ep in reference.items()}
    r = drive.ring_size(window, chunk)

    for method, res in results.items():
        ring = res["ring_buffer_kv_cache"].stats
        assert (ring.matched, ring.rewritten, dict(ring.skipped)) == (2, 2, {}), (method, res.summary())
        assert [(site["write"], site["readers"]) for site in ring.sites] == [("index_copy", [spelling])] * 2
        assert drive.cache_lengths(res.ep, sliding + full) == {**dict.fromkeys(sliding, r), **dict.fromkeys(full, MAX_CONTEXT)}
        assert drive.aten_sdpa_left(res.ep) == 0, method
    decode = results["decode"].ep
    reads = drive.splitk_reads(decode, sliding + full)
    assert reads == [
        {"q": (1, n_heads, 1, head_dim), "k": (1, n_kv_heads, length, head_dim), "v": (1, n_kv_heads, length, head_dim),
         "k_cache": names[0], "v_cache": names[1]}
        for names, length in ((sliding, r), (full, MAX_CONTEXT))
    ]
    assert drive.kv_expansions(decode, sliding + full) == []

    tokens = torch.randint(0, 64, (1, MAX_CONTEXT), generator=torch.Generator().manual_seed(1))
    drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, chunks)


@pytest.mark.parametrize("spelling", ["repeat_interleave", "enable_gqa", "repeat_kv"])
def test_gqa_spellings_ring_and_splitk(spelling):
    """4 query heads on 2 KV heads, window 4, chunks up to 7 (R = max(8, 10) = 10)."""
    check(spelling, n_heads=4, n_kv_heads=2, head_dim=8, window=4, chunk=7, chunks=[7, 3, 6])


@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # no shrinking: each example exports twice
@given(
    heads=st.sampled_from([(2, 1), (2, 2), (4, 1), (4, 4), (6, 2)]),  # (n_heads, n_kv_heads), n_rep 1..4
    head_dim=st.sampled_from([4, 8, 16]),
    window=st.integers(2, 6),
    chunk=st.integers(2, 9),
    data=st.data(),
)
def test_executorch_shapes_drawn(heads, head_dim, window, chunk, data):
    """ExecuTorch's own spelling (repeat_interleave, n_rep = 1 included) over drawn shapes."""
    chunks = data.draw(st.lists(st.integers(1, chunk), min_size=1, max_size=3), label="chunks")
    check("repeat_interleave", heads[0], heads[1], head_dim, window, chunk, chunks)


def test_executorch_own_ring_cache_left_alone():
    """``export_llama --local_global_attention`` swaps in ExecuTorch's own ``RingKVCache`` (2W
    slots, written at ``(arange(L) + start) % 2W`` with slot positions kept in a buffer, its own
    float mask): RingBufferKVCache leaves that ring as it is, SDPADispatch still gives its decode
    attention split-K on the 2 KV heads, and the numbers are unchanged."""
    from executorch.examples.models.llama.source_transformation.custom_kv_cache import (
        replace_kv_cache_with_ring_kv_cache,
    )

    model = build(4, 2, 8, 4, "repeat_interleave")
    model.layers[0].attention.mask.fill_(True)  # ExecuTorch's ring computes its own mask
    replace_kv_cache_with_ring_kv_cache(model, [4, 0])  # layer 0: window 4, layer 1: global
    reference = {m: drive.normalized(ep) for m, ep in export(model, 4).items()}
    names = cache_names(0) + cache_names(1)
    passes = [RingBufferKVCache({n: 4 for n in cache_names(0)}), SDPADispatch(threshold=0)]
    results = {m: apply(ep, passes, method=m, dump=False) for m, ep in reference.items()}
    for method, res in results.items():
        ring = res["ring_buffer_kv_cache"].stats
        assert not ring.rewritten and dict(ring.skipped) == {"cache length <= ring size (already a ring, or nothing to save)": 2}
        assert drive.cache_lengths(res.ep, names) == {**dict.fromkeys(cache_names(0), 8), **dict.fromkeys(cache_names(1), MAX_CONTEXT)}
    assert [(r["k"], r["k_cache"]) for r in drive.splitk_reads(results["decode"].ep, names)] == [
        ((1, 2, 8, 8), cache_names(0)[0]), ((1, 2, MAX_CONTEXT, 8), cache_names(1)[0])
    ]
    assert drive.kv_expansions(results["decode"].ep, names) == []
    tokens = torch.randint(0, 64, (1, MAX_CONTEXT), generator=torch.Generator().manual_seed(1))
    drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, [4, 3, 4])
