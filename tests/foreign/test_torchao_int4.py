"""Int4Dispatch on a torchao-quantized transformers Llama, exported by transformers' recipe.

``torchao.quantization.quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4,
granularity=PerGroup(32)))`` on every linear of a tiny random ``LlamaForCausalLM`` (K = 64),
then ``TorchExportableModuleForDecoderOnlyLM(...).export(strict=False)`` for prefill (dynamic
length) and decode: each linear exports as ``torchao.dequantize_affine(qdata, [1, 32], scale,
zero_point, int8, -8, 7) -> linear``. Reference: the same programs without the pass.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from fxport.passes import Int4Dispatch, SDPADispatch, apply
from fxport.tests.foreign import drive

transformers = pytest.importorskip("transformers")
torchao_q = pytest.importorskip("torchao.quantization")

from torchao.quantization.granularity import PerGroup  # noqa: E402
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM  # noqa: E402

S, CHUNK = 16, 6
LINEARS = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head


def feed(method, tokens, start):
    return (), {"input_ids": tokens, "cache_position": torch.arange(start, start + tokens.shape[1])}


def test_torchao_int4_llama_gemv_in_decode_dequant_in_prefill():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=S)
    L = Dim("L", min=1, max=CHUNK)
    with torch.no_grad():
        programs = {
            "prefill": wrapper.export(input_ids=torch.zeros(1, 3, dtype=torch.long), cache_position=torch.arange(3),
                                      dynamic_shapes={"input_ids": {1: L}, "cache_position": {0: L}}, strict=False),
            "decode": wrapper.export(input_ids=torch.zeros(1, 1, dtype=torch.long), cache_position=torch.arange(1),
                                     strict=False),
        }
    reference = {m: drive.normalized(ep) for m, ep in programs.items()}
    results = {m: apply(ep, [Int4Dispatch(), SDPADispatch(threshold=0)], method=m, dump=False) for m, ep in reference.items()}

    choices = {m: [s["choice"] for s in res["int4_dispatch"].stats.sites] for m, res in results.items()}
    assert choices == {"prefill": ["dequant"] * LINEARS, "decode": ["gemv"] * LINEARS}
    for method, res in results.items():
        stats = res["int4_dispatch"].stats
        assert (stats.matched, stats.rewritten, dict(stats.skipped)) == (LINEARS, LINEARS, {}), method
        assert drive.calls(res.ep, "torchao.dequantize_affine.default") == [], method
    assert len(drive.calls(results["decode"].ep, "fxport.int4_gemv.default")) == LINEARS
    assert len(drive.calls(results["prefill"].ep, "fxport.int4_dequant.default")) == LINEARS
    # One packed weight format for both methods: same constant names, identical tensors.
    packed = {m: {k: v for k, v in res.ep.constants.items() if k.endswith(("weight_packed", "weight_scales", "weight_zeros"))}
              for m, res in results.items()}
    assert len(packed["decode"]) == 3 * LINEARS and packed["decode"].keys() == packed["prefill"].keys()
    assert all(torch.equal(packed["decode"][k], packed["prefill"][k]) for k in packed["decode"])
    # Decode attention reads the un-expanded cache through split-K.
    caches = [f"{kv}_cache_{i}" for i in range(2) for kv in ("key", "value")]
    assert [(r["k"], r["k_cache"]) for r in drive.splitk_reads(results["decode"].ep, caches)] == [
        ((1, 2, S, 16), "key_cache_0"), ((1, 2, S, 16), "key_cache_1")
    ]
    assert drive.kv_expansions(results["decode"].ep, caches) == []

    tokens = torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(1))
    # fp32: the GEMV reads the same int4 codes, only its accumulation order differs.
    drive.compare(reference, {m: res.ep for m, res in results.items()}, feed, tokens, [6, 3])
