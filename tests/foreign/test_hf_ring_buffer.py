"""RingBufferKVCache on a foreign graph: transformers' Gemma 3 exported the ExecuTorch way.

``transformers.integrations.executorch.convert_and_export_with_cache`` wraps the model in
``TorchExportableModuleWithStaticCache``, which replaces the sliding-window cache layers by
full-length ``StaticLayer``s (buffers ``key_cache_{i}`` / ``value_cache_{i}``, written with
``index_copy_(2, arange(L) + cumulative_length_i, k)``) and exports with ``strict=True``.
The pass gets an explicit ``{buffer: window}`` mapping, since those names are not fxport's.
Reference: the same programs without the pass, run over the same steps.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache
from fxport.tests.steps import run_steps

SLIDING = "sliding_attention"
WINDOW, MAX_CACHE, MAX_CHUNK = 4, 16, 5  # R = 2 * WINDOW = 8: chunks up to R - W + 1 = 5


def hf_model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
        max_position_embeddings=64, layer_types=[SLIDING, "full_attention", SLIDING],
        attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static",
        cache_config={"batch_size": 1, "max_cache_len": MAX_CACHE},
    )
    return model


def export_hf(model, n: int, dynamic: bool):
    from transformers.integrations.executorch import convert_and_export_with_cache

    shapes = None
    if dynamic:
        L = Dim("L", min=1, max=n)
        shapes = {"input_ids": {1: L}, "cache_position": {0: L}}
    ep = convert_and_export_with_cache(
        model, torch.zeros(1, n, dtype=torch.long), torch.arange(n), dynamic_shapes=shapes
    )
    return ep.run_decompositions({})


def feed(method, tokens, start):  # transformers' exported wrappers take keywords
    return (), {"input_ids": tokens, "cache_position": torch.arange(start, start + tokens.shape[1])}


def test_hf_gemma3_static_cache_ring_buffer_matches():
    model = hf_model()
    programs = {"prefill": export_hf(model, MAX_CHUNK, True), "decode": export_hf(model, 1, False)}
    windows = {
        f"{kv}_cache_{i}": WINDOW
        for i, kind in enumerate(model.config.layer_types)
        if kind == SLIDING
        for kv in ("key", "value")
    }
    results = {k: RingBufferKVCache(windows)(ep) for k, ep in programs.items()}
    for method, result in results.items():
        assert result.changed, method
        assert (result.stats.matched, result.stats.rewritten, dict(result.stats.skipped)) == (4, 4, {})
        shapes = {n: tuple(t.shape) for n, t in result.ep.constants.items() if "_cache_" in n}
        assert shapes == {
            "key_cache_0": (1, 2, 8, 8), "value_cache_0": (1, 2, 8, 8),
            "key_cache_1": (1, 2, MAX_CACHE, 8), "value_cache_1": (1, 2, MAX_CACHE, 8),  # global
            "key_cache_2": (1, 2, 8, 8), "value_cache_2": (1, 2, 8, 8),
        }, method

    # 16 positions: past the window (4) and twice around the ring (8).
    tokens = torch.randint(0, 128, (1, MAX_CACHE), generator=torch.Generator().manual_seed(0))
    chunks = [5, 2, 5]
    expected = run_steps(programs, tokens, chunks, feed)
    got = run_steps({k: r.ep for k, r in results.items()}, tokens, chunks, feed)
    assert len(got) == len(expected) == 3 + 4
    for step, (e, g) in enumerate(zip(expected, got)):
        # float32; the ring only reorders the softmax sum over the slots.
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    # The unrewritten programs themselves match transformers' eager forward (sanity of the setup).
    with torch.no_grad():
        eager = model(tokens).logits
    torch.testing.assert_close(torch.cat(expected, 1), eager, rtol=1e-4, atol=1e-4)
