"""CUDA dry run on CPU: the tiny Gemma through the CUDA passes, partitioned by CudaPartitioner."""

from __future__ import annotations

import pytest
import torch

import fxport.kernels.attention_ops  # noqa: F401  (registers fxport::sdpa*)
import fxport.kernels.int4_ops  # noqa: F401  (registers fxport::int4_*)
from fxport.lowering.cuda import cuda_dry_run, inductor_coverage


@pytest.fixture(scope="module")
def report(tiny):
    return cuda_dry_run(tiny.model(), max_prefill_chunk=tiny.max_chunk, quant="int4")


def test_cuda_passes_rewrite_every_site(report):
    prefill, decode = report.pass_results["prefill"], report.pass_results["decode"]
    assert [r.name for r in prefill.records] == ["ring_buffer_kv_cache", "sdpa_dispatch", "int4_dispatch", "last_token_logits"]
    assert [r.name for r in decode.records] == ["ring_buffer_kv_cache", "sdpa_dispatch", "int4_dispatch"]
    for res in (prefill, decode):
        assert res["ring_buffer_kv_cache"].stats.rewritten == 2  # k and v cache of the sliding layer
        assert res["sdpa_dispatch"].stats.rewritten == 2  # both layers' attention
        assert res["int4_dispatch"].stats.rewritten == 15  # 7 linears x 2 layers + head


def test_every_node_delegated(report):
    for method in ("prefill", "decode"):
        rep = report.delegation[method]
        assert rep.undelegated == [], rep.undelegated
        assert rep.delegates == 1  # one convex partition: the whole method
        assert report.unsupported[method] == []
    assert report.fully_delegated
    assert "result: every node delegated" in report.summary()


def test_fxport_kernels_reach_aotinductor_as_triton_ops(report):
    assert report.fallback["decode"]["fxport.int4_gemv"] == "triton_op"
    assert report.fallback["prefill"]["fxport.int4_dequant"] == "triton_op"
    assert report.fallback["decode"]["fxport.sdpa"] == "triton_op"
    assert "aten.scaled_dot_product_attention" not in report.fallback["decode"]


def test_coverage_classifies_fallbacks():
    aten = torch.ops.aten
    assert inductor_coverage(aten.mm.default) == "lowered"
    assert inductor_coverage(aten.sort.stable) in ("lowered", "fallback-supported")
    assert inductor_coverage(aten.nonzero.default) == "fallback-unsupported"
    assert inductor_coverage(torch.ops.fxport.int4_gemv.default) == "triton_op"
