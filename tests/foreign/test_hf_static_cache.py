"""RingBufferKVCache + SDPADispatch on transformers' own ExecuTorch exports (transformers 5.23).

``transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM(model, 1, S).export(
input_ids=..., cache_position=..., dynamic_shapes=..., strict=False)`` as transformers ships it
(static cache: every layer a full-length ``StaticLayer`` registered as buffers ``key_cache_{i}`` /
``value_cache_{i}``, written with ``index_copy_(2, cache_position, k)``; sliding layers get their
window from transformers' own mask). Tiny random Llama (no sliding layer), Qwen2 (sliding above
``max_window_layers``), Mistral (every layer sliding) and Gemma 3 (one sliding, one global
layer), all GQA (4 query heads on 2 KV heads) with ``attn_implementation="sdpa"``; Gemma 2, which
transformers only runs with eager attention, is checked to be left alone with the reason.
Reference: the same exported programs without the passes.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from fxport.passes import RingBufferKVCache, SDPADispatch, apply
from fxport.tests.foreign import drive

transformers = pytest.importorskip("transformers")

from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM  # noqa: E402

S, WINDOW, CHUNK, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 7, 4, 2, 8
COMMON = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=64, attn_implementation="sdpa",
)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))


def qwen2():  # layer 0 full, layer 1 sliding
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    )


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=WINDOW))


def gemma2():
    """As transformers ships it: logit softcapping, which its SDPA path refuses, so "eager"."""
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **{**COMMON, "attn_implementation": "eager"}, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ))


def gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
    ))


def sliding_layers(model) -> list[int]:
    config = model.config
    if getattr(config, "layer_types", None) is None:  # Mistral: one window for every layer
        return list(range(config.num_hidden_layers)) if getattr(config, "sliding_window", None) else []
    return [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]


def export(model) -> dict:
    """transformers' recipe, prefill with a dynamic length up to CHUNK, decode of one token.

    ``strict=False`` (the recipe's own switch): the same graph as its default strict export
    (``test_hf_ring_buffer.py`` covers that one), at a third of the export time."""
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=S)
    L = Dim("L", min=1, max=CHUNK)
    with torch.no_grad():
        prefill = wrapper.export(input_ids=torch.zeros(1, 3, dtype=torch.long), cache_position=torch.arange(3),
                                 dynamic_shapes={"input_ids": {1: L}, "cache_position": {0: L}}, strict=False)
        decode = wrapper.export(input_ids=torch.zeros(1, 1, dtype=torch.long), cache_position=torch.arange(1), strict=False)
    return {"prefill": prefill, "decode": decode}


def feed(method, tokens, start):
    return (), {"input_ids": tokens, "cache_position": torch.arange(start, start + tokens.shape[1])}


@pytest.mark.parametrize("make", [llama, qwen2, mistral, gemma3], ids=lambda f: f.__name__)
def test_static_cache_export_ring_and_splitk(make):
    torch.manual_seed(0)
    model = make().eval()
    model.generation_config.cache_implementation = "static"
    sliding = [f"{kv}_cache_{i}" for i in sliding_layers(model) for kv in ("key", "value")]
    caches = [f"{kv}_cache_{i}" for i in range(2) for kv in ("key", "value")]
    reference = {m: drive.normalized(ep) for m, ep in export(model).items()}

    passes = [RingBufferKVCache({n: WINDOW for n in sliding}), SDPADispatch(threshold=0)]
    results = {m: apply(ep, passes, method=m, dump=False) for m, ep in reference.items()}
    r = drive.ring_size(WINDOW, CHUNK)  # max(8, 10) = 10
    for method, res in results.items():
        ring = res["ring_buffer_kv_cache"].stats
        assert (ring.rewritten, dict(ring.skipped)) == (len(sliding), {}), (method, res.summary())
        assert [(site["write"], site["readers"]) for site in ring.sites] == [("index_copy", ["repeat_kv"])] * len(sliding)
        assert drive.cache_lengths(res.ep, caches) == {n: r if n in sliding else S for n in caches}
        assert drive.aten_sdpa_left(res.ep) == 0, method
    decode = results["decode"].ep
    reads = drive.splitk_reads(decode, caches)
    assert reads == [
        {"q": (1, HEADS, 1, HEAD_DIM), "k": (1, KV_HEADS, r if f"key_cache_{i}" in sliding else S, HEAD_DIM),
         "v": (1, KV_HEADS, r if f"key_cache_{i}" in sliding else S, HEAD_DIM),
         "k_cache": f"key_cache_{i}", "v_cache": f"value_cache_{i}"}
        for i in range(2)
    ]
    assert drive.kv_expansions(decode, caches) == []

    # S positions: the window (4) passed several times, the ring (10) wrapped twice.
    tokens = torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(1))
    expected = drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, [7, 2, 6])
    # The unrewritten programs equal transformers' eager forward (sanity of the setup).
    with torch.no_grad():
        eager = model(tokens).logits
    torch.testing.assert_close(torch.cat(expected, 1), eager, rtol=1e-4, atol=1e-4)


def test_gemma2_eager_attention_left_alone():
    """transformers 5.23 refuses SDPA for Gemma 2 (attention logit softcapping), so its export has
    eager attention (``matmul -> tanh softcap -> softmax -> matmul``): no SDPA site to dispatch, and
    the sliding caches, read by that chain, are left full length with the reason stated."""
    torch.manual_seed(0)
    model = gemma2().eval()
    model.generation_config.cache_implementation = "static"
    sliding = [f"{kv}_cache_{i}" for i in sliding_layers(model) for kv in ("key", "value")]
    for method, ep in export(model).items():
        res = apply(drive.normalized(ep), [RingBufferKVCache({n: WINDOW for n in sliding}), SDPADispatch(threshold=0)],
                    method=method, dump=False)
        assert not res.changed, method
        ring, sdpa = res["ring_buffer_kv_cache"].stats, res["sdpa_dispatch"].stats
        assert (ring.matched, ring.rewritten, sum(ring.skipped.values())) == (2, 0, 2), method
        assert ring.skipped == {"cache not read by any SDPA (read by aten.unsqueeze.default; attention spelled as "
                                "matmul/softmax is left alone)": 2}, ring.skipped
        assert (sdpa.matched, sdpa.rewritten) == (0, 0), method
        assert drive.cache_lengths(res.ep, sliding) == dict.fromkeys(sliding, S)
