"""CustomSDPA on drawn one-layer decoders: KV heads, GQA ratio, head dim, cache length, mask
(causal, or a sliding window of 2 .. S + 2) and the prefill chunks.

The path follows the contract: ``custom_sdpa(..., is_causal=True)`` on the whole cache iff the
mask is exactly causal (no window, or a window >= S), else the prefix case (K/V and the mask
cut to ``start + L`` columns, ``is_causal=False``). The rewritten programs' logits equal the
unrewritten programs' at every step of chunked prefill then decode (float32, ``TOL``). The
module is the one of test_custom_sdpa.py (``TinyDecoder``); its exports are cached per config.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.passes.base import PassContext
from fxport.passes.xnnpack import CustomSDPA
from fxport.passes.xnnpack.custom_sdpa import llama_ops
from fxport.tests.passes.xnnpack.test_custom_sdpa import TOL, VOCAB, TinyDecoder, cache_shapes, export_methods
from fxport.tests.steps import run_steps

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@functools.lru_cache(maxsize=None)
def programs(h_kv: int, n_rep: int, d: int, S: int, window: int | None, chunk: int) -> dict:
    """{"prefill": L dynamic up to ``chunk`` (static when 1), "decode"} of the drawn decoder."""
    torch.manual_seed(S * 100 + d)
    model = TinyDecoder(layers=(window or "causal",), S=S, h_q=h_kv * n_rep, h_kv=h_kv, d=d).eval()
    return export_methods(model, chunk)


@given(
    h_kv=st.sampled_from([1, 2]),
    n_rep=st.sampled_from([1, 2]),
    d=st.sampled_from([4, 8]),
    S=st.integers(6, 16),
    data=st.data(),
)
@settings(max_examples=10, deadline=None)  # ~1 s per drawn case (two exports, two runs)
def test_custom_sdpa_matches_sdpa_at_every_step(h_kv, n_rep, d, S, data):
    window = data.draw(st.one_of(st.none(), st.integers(2, S + 2)), label="window (None: causal)")
    chunk = data.draw(st.integers(1, min(6, S)), label="largest prefill chunk")
    prompt = data.draw(st.integers(1, S), label="prompt length")
    chunks = []
    while sum(chunks) < prompt:
        chunks.append(data.draw(st.integers(1, min(chunk, prompt - sum(chunks))), label="chunk"))

    reference = programs(h_kv, n_rep, d, S, window, chunk)
    pass_ = CustomSDPA()
    results = {m: pass_(ep, PassContext(method=m)) for m, ep in reference.items()}
    causal = window is None or window >= S
    for method, result in results.items():
        ep = result.ep
        assert (result.stats.matched, result.stats.rewritten, dict(result.stats.skipped)) == (1, 1, {}), method
        [node] = [n for n in ep.graph.nodes if n.target == llama_ops().custom_sdpa.default]
        assert node.args[6] is causal and (node.args[4] is None) is causal, method
        targets = [n.target for n in ep.graph.nodes]
        assert SDPA not in targets
        assert targets.count(aten.slice.Tensor) == (0 if causal else 3), method  # mask, K, V cut
        assert cache_shapes(ep) == {f"model.layers.0.self_attn.{kv}_cache": (1, S, h_kv, d) for kv in "kv"}

    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(S))
    expected = run_steps(reference, tokens, chunks)
    got = run_steps({m: r.ep for m, r in results.items()}, tokens, chunks)
    assert len(got) == len(expected) == len(chunks) + S - prompt
    for step, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")
