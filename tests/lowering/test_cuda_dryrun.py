"""CUDA dry run on CPU: the tiny Gemma through the CUDA passes, partitioned by CudaPartitioner."""

from __future__ import annotations

import re

import pytest
import torch

import fxport.kernels.attention_ops  # noqa: F401  (registers fxport::sdpa*)
import fxport.kernels.int4_ops  # noqa: F401  (registers fxport::int4_*)
from fxport.builder import BuildOptions, Source, build
from fxport.lowering.cuda import inductor_coverage


def cuda_dry_run(model, max_prefill_chunk):
    """The builder's CUDA dry run of an eager model (int4): its partition report."""
    options = BuildOptions(backend="cuda", quant="int4", max_seq_len=int(model.max_seq_len),
                           max_prefill_chunk=max_prefill_chunk, dry_run=True)
    return build(Source(model=model), None, options).report


@pytest.fixture(scope="module")
def report(tiny):
    return cuda_dry_run(tiny.model(), max_prefill_chunk=tiny.max_chunk)


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


@pytest.fixture(scope="module")
def meta_report(tiny):
    """The same dry run on the meta device (what `fxport export --dry-run` does with a preset)."""
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(tiny.config(), max_seq_len=tiny.max_seq_len).eval()
    return cuda_dry_run(model, max_prefill_chunk=tiny.max_chunk)


def _device_free(graph) -> str:
    """The graph's text with the device of created tensors (``arange(..., device=cpu)``) blanked."""
    return re.sub(r"(device\W+)(cpu|meta)", r"\1D", str(graph))


def test_meta_device_dry_run_equals_the_real_one(report, meta_report):
    """Without values the int4 path rewrites the same sites, partitions the same ops and counts
    the same bytes; the skipped range check is counted (15 sites per method).

    One difference comes from torch.export, before any pass: SDPA's output on the meta device
    has the math kernel's contiguous (B, H, L, D) strides, on CPU the flash kernel's (B, L, H, D),
    so on meta the prefill's ``transpose(1, 2).reshape`` copies (one clone per layer)."""
    from fxport.passes.int4_dispatch import META_RANGE_UNCHECKED

    for method in ("prefill", "decode"):
        real, meta = report.pass_results[method], meta_report.pass_results[method]
        for r, m in zip(real.records, meta.records, strict=True):
            assert (m.name, m.changed, m.stats.matched, m.stats.rewritten) == \
                   (r.name, r.changed, r.stats.matched, r.stats.rewritten)
            assert [s.get("choice") for s in m.stats.sites] == [s.get("choice") for s in r.stats.sites]
        assert dict(meta["int4_dispatch"].stats.skipped) == {META_RANGE_UNCHECKED: 15}
        assert dict(real["int4_dispatch"].stats.skipped) == {}
        got, want = meta_report.delegation[method].delegated_ops, report.delegation[method].delegated_ops
        diff = {op: (want[op], got[op]) for op in set(got) | set(want) if got[op] != want[op]}
        assert diff == ({"dim_order_ops._clone_dim_order": (0, 2)} if method == "prefill" else {})
        assert meta_report.delegation[method].undelegated == report.delegation[method].undelegated == []
    assert _device_free(meta_report.pass_results["decode"].ep.graph) == _device_free(report.pass_results["decode"].ep.graph)
    assert meta_report.signatures == report.signatures
    assert meta_report.state == report.state
    assert meta_report.fully_delegated


def test_report_names_methods_inputs_and_bytes(report, tiny):
    sig = report.signatures
    assert list(sig) == ["prefill", "decode"]
    assert sig["decode"] == [("tokens", (1, 1), torch.int64), ("input_pos", (1,), torch.int64)]
    (tok, (one, length), _), (pos, (length2,), _) = sig["prefill"]
    assert (tok, one, pos) == ("tokens", 1, "input_pos") and length == length2
    assert length.endswith(f"<={tiny.max_chunk}")  # L in [1, max prefill chunk]
    # KV caches, fp32, 1 KV head of dim 16: the sliding layer ringed to 2 * window = 8 slots,
    # the full layer keeps max_seq_len = 16.
    assert report.state.mutable == {
        "model.layers.0.self_attn.k_cache": 8 * 16 * 4, "model.layers.0.self_attn.v_cache": 8 * 16 * 4,
        "model.layers.1.self_attn.k_cache": 16 * 16 * 4, "model.layers.1.self_attn.v_cache": 16 * 16 * 4,
    }
    # int4 weights: (N, K) -> N * K / 2 packed bytes + fp32 scales and zeros per group of 32.
    model = tiny.model()
    linears = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 15
    for name, (n, k) in linears.items():
        w = report.state.weights
        assert (w[f"{name}.weight_packed"], w[f"{name}.weight_scales"], w[f"{name}.weight_zeros"]) == \
               (n * k // 2, n * k // 32 * 4, n * k // 32 * 4)
    assert not any(name.endswith("qdata") or "parametrizations" in name for name in report.state.weights)
    text = report.summary()
    assert "methods: prefill, decode" in text
    assert "    decode(tokens (1, 1) int64, input_pos (1,) int64)" in text
    assert f"KV cache (mutable buffers): 4 tensors, {report.state.mutable_bytes} bytes (0.00 MiB)" in text


def test_the_cuda_program_follows_the_runner_contract(report, tiny):
    """The methods, their inputs and the constant methods the lowering stores are what
    ExecuTorch's TextLLMRunner reads (fxport.contract); the summary says so."""
    assert report.contract == []
    assert report.constant_methods == tiny.metadata()
    assert report.io["prefill"] == {"inputs": [(torch.int64, (1, tiny.max_chunk)), (torch.int64, (tiny.max_chunk,))],
                                    "outputs": [(torch.float32, (1, 1, 256))]}  # last-token logits
    assert report.io["decode"] == {"inputs": [(torch.int64, (1, 1)), (torch.int64, (1,))],
                                   "outputs": [(torch.float32, (1, 1, 256))]}
    lines = report.summary().splitlines()
    assert "runner contract: ok" in lines
    assert (f"constant methods: get_max_seq_len={tiny.max_chunk}, get_max_context_len=16, use_kv_cache=1, "
            "use_sdpa_with_kv_cache=0, enable_dynamic_shape=1, get_eos_ids=[1], get_activation_dtype=6, "
            "get_logits_to_keep_mode=1, get_vocab_size=256, get_bos_id=2") in lines


def test_contract_problems_are_listed(report, tiny):
    import copy

    broken = copy.copy(report)
    constants = {**tiny.metadata(), "get_max_seq_len": tiny.max_chunk + 1}
    del constants["get_eos_ids"]
    assert broken.check_contract(constants) == [
        "constant method get_eos_ids is missing",
        f"get_max_seq_len = {tiny.max_chunk + 1} but prefill accepts at most {tiny.max_chunk} tokens per call; "
        "get_max_seq_len must be the largest prefill chunk",
    ]
    lines = broken.summary().splitlines()
    i = lines.index("runner contract: 2 problem(s)")
    assert lines[i + 1] == "    constant method get_eos_ids is missing"
    assert report.contract == []  # the fixture's report is untouched
