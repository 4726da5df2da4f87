"""XNNPACK lowering: a tiny Gemma through passes -> .pte -> executorch.runtime == eager.

One fp32 program is lowered per session (module fixture); every round-trip test runs the .pte
with :class:`PteBackend` and compares with the eager model. The 8da4w path (quantized
linears lowered to XNNPACK) is checked end to end against the quantized eager model in
tests/cli/test_cli.py (``fxport export --quant 8da4w`` then ``fxport run``).
"""

from __future__ import annotations

import pytest
import torch

from fxport.runtime.pte_backend import PteBackend, PteError
from fxport.lowering.xnnpack import (
    XnnpackWeightQuant,
    apply_method_passes,
    cpu_passes,
    lower_to_xnnpack,
    quantize_for_xnnpack,
)
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import sliding_window_buffers
from fxport.tests.lowering.helpers import lower_fast


CACHES = [f"model.layers.{i}.self_attn.{kv}_cache" for i in (0, 1) for kv in ("k", "v")]


def _lower(tiny, model, tmp_path_factory, name):
    with torch.no_grad():
        programs = export_methods(model, max_prefill_chunk=tiny.max_chunk)
    programs, results = apply_method_passes(programs, cpu_passes(windows=sliding_window_buffers(model)))
    lowered = lower_fast(programs, constant_methods=tiny.metadata())
    path = lowered.save(tmp_path_factory.mktemp(name) / f"{name}.pte")
    return lowered, results, path


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return _lower(tiny, tiny.model(), tmp_path_factory, "fp32")


def _eager_steps(model, tokens, chunks):
    """Last-position logits after each prefill chunk, then after each single decode token."""
    model.reset_caches()
    outs, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(tokens[:, pos : pos + n], torch.arange(pos, pos + n))[:, -1])
            pos += n
        for p in range(pos, tokens.shape[1]):
            outs.append(model(tokens[:, p : p + 1], torch.tensor([p]))[:, -1])
    return outs


def _pte_steps(backend, tokens, chunks):
    outs, pos = [], 0
    for n in chunks:
        outs.append(backend.prefill(tokens[:, pos : pos + n], torch.arange(pos, pos + n))[:, -1])
        pos += n
    for p in range(pos, tokens.shape[1]):
        outs.append(backend.decode(tokens[:, p : p + 1], torch.tensor([p]))[:, -1])
    return outs


def test_passes_applied_per_method(fp32):
    _, results, _ = fp32
    common = ["ring_buffer_kv_cache", "gelu_tanh_as_sigmoid", "additive_attention_mask", "sdpa_as_matmul", "rms_norm_as_linear",
              "symbolic_view_as_inferred"]
    assert [r.name for r in results["prefill"].records] == [*common, "rotate_half_as_linear", "last_token_logits",
                                                            "edge_decompositions"]
    assert [r.name for r in results["decode"].records] == [*common, "edge_decompositions"]
    # prefill (dynamic L): GQA folded too, and rotate_half of q and k in both layers as a linear.
    assert [s["gqa_folded"] for s in results["prefill"]["sdpa_as_matmul"].stats.sites] == [True, True]
    assert results["prefill"]["rotate_half_as_linear"].stats.rewritten == 2 * 2
    # decode: both layers' attention runs on the un-expanded cache (GQA folded, L == 1).
    assert [{k: s[k] for k in ("node", "gqa_folded")} for s in results["decode"]["sdpa_as_matmul"].stats.sites] == [
        {"node": "scaled_dot_product_attention", "gqa_folded": True},
        {"node": "scaled_dot_product_attention_1", "gqa_folded": True},
    ]
    # q/k norms and the four block norms of 2 layers + the final norm.
    assert results["decode"]["rms_norm_as_linear"].stats.rewritten == 2 * 6 + 1
    # The sliding layer's two caches become rings of 2 * window = 8 slots; the full layer keeps 16.
    assert results["prefill"]["ring_buffer_kv_cache"].stats.rewritten == 2
    assert results["prefill"]["last_token_logits"].stats.rewritten == 1


def test_mutable_buffer_names_and_shared_planning(fp32):
    lowered, _, _ = fp32
    assert lowered.mutable_buffers == sorted(CACHES)
    # Every method's plan places each cache at the same (memory id, offset): one allocation.
    placements = {}
    for plan in lowered.executorch_program.execution_plan:
        found = {}
        for value in plan.values:
            info = getattr(value.val, "extra_tensor_info", None)
            if info is not None and info.fully_qualified_name in CACHES:
                alloc = value.val.allocation_info
                found[info.fully_qualified_name] = (alloc.memory_id, alloc.memory_offset_low, alloc.memory_offset_high)
        placements[plan.name] = found
    assert set(placements) >= {"prefill", "decode"}
    assert set(placements["prefill"]) == set(CACHES)
    assert placements["prefill"] == placements["decode"]
    assert len({v for v in placements["decode"].values()}) == len(CACHES)  # distinct slots


def test_decode_is_a_few_xnnpack_subgraphs(fp32):
    """Per layer only the cache write splits the delegate; norms/attention stay inside."""
    lowered, _, _ = fp32
    report = lowered.report["decode"]
    assert report.delegates <= 2 * 2 + 1  # per layer: before and after the cache write, + head
    leftover = set(report.undelegated_ops)
    assert not leftover & {"aten.mean.dim", "aten.expand_copy", "aten.any.dim", "aten.mul.Scalar", "aten.add.Scalar"}, leftover


def test_linears_are_delegated(fp32):
    lowered, _, _ = fp32
    for method in ("prefill", "decode"):
        report = lowered.report[method]
        leftover = set(report.undelegated_ops)
        assert report.delegates > 0
        assert not {"aten.linear", "aten.mm", "aten.addmm", "aten.bmm"} & {op.rsplit(".", 1)[0] for op in leftover}, leftover


def test_fp32_round_trip_matches_eager(fp32, tiny):
    _, _, path = fp32
    backend = PteBackend(path)
    assert (backend.max_seq_len, backend.max_prefill_chunk) == (tiny.max_seq_len, tiny.max_chunk)
    model = tiny.model()
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 14))
    chunks = [5, 3, 1]  # then 5 decode steps: positions run past the ring size (8)
    want = _eager_steps(model, tokens, chunks)
    got = _pte_steps(backend, tokens, chunks)
    assert len(got) == len(want) == 8
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape == (1, model.config.vocab_size)
        # fp32, different summation order (XNNPACK GEMMs, ring-buffer softmax over 8 slots):
        # max abs error within 1e-4 of the logits' scale (|logits| ~ 60 here).
        err = (g - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item(), f"step {step}: max abs error {err}"


def test_decode_reads_cache_written_by_prefill(fp32, tiny):
    """decode after prefill sees the prompt: equal to eager-with-context, far from eager-without."""
    _, _, path = fp32
    backend = PteBackend(path)
    model = tiny.model()
    torch.manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (1, 6))
    backend.prefill(tokens[:, :5], torch.arange(5))
    got = backend.decode(tokens[:, 5:], torch.tensor([5]))[:, -1]
    with_context = _eager_steps(model, tokens, [5])[-1]
    model.reset_caches()
    with torch.no_grad():  # same token and position, but an empty (zero) cache
        without = model(tokens[:, 5:], torch.tensor([5]))[:, -1]
    scale = with_context.abs().max().item()
    assert (got - with_context).abs().max().item() <= 1e-4 * scale  # fp32 summation order
    assert (got - without).abs().max().item() > 1e-2 * scale


def test_quant_report_for_fxport_recipe(tiny):
    model = tiny.model()
    report = quantize_for_xnnpack(model, "default")
    # default recipe: attention/MLP linears int4 g32 (symmetric on XNNPACK); the tied head takes
    # the embedding's int8 per-channel rule; the embedding itself is not a linear.
    assert report.quantized["lm_head"] == "8da8w per-channel"
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "8da4w g32"
    assert report.quantized["model.layers.1.mlp.down_proj"] == "8da4w g32"
    assert len(report.quantized) == 2 * 7 + 1
    assert report.kept_float == {}


def test_unknown_recipe_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"unknown quantization recipe 'int3'; choose one of: 8da4w, 8da4w-head8, 8da8w, balanced, compact, default, sensitive"):
        quantize_for_xnnpack(tiny.model(), "int3")
    with pytest.raises(ValueError, match="4-bit weights need a group_size"):
        XnnpackWeightQuant(4, None)


def test_methods_with_different_caches_are_rejected(tiny):
    model = tiny.model()
    with torch.no_grad():
        programs = export_methods(model, max_prefill_chunk=tiny.max_chunk)
    ringed, _ = apply_method_passes({"decode": programs["decode"]}, cpu_passes(windows=sliding_window_buffers(model)))
    with pytest.raises(ValueError, match=r"buffer model\.layers\.0\.self_attn\.k_cache has shape \(1, 1, 8, 16\) in 'decode' but \(1, 1, 16, 16\) in 'prefill'"):
        lower_to_xnnpack({"prefill": programs["prefill"], "decode": ringed["decode"]})


def test_pte_backend_rejects_bad_files(tmp_path):
    with pytest.raises(PteError, match="no such .pte file"):
        PteBackend(tmp_path / "missing.pte")
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all")
    with pytest.raises(PteError, match="is not a loadable ExecuTorch program"):
        PteBackend(bad)


def test_cpu_passes_keep_eager_numerics(tiny):
    """The CPU pass set alone (no lowering): rewritten programs run eagerly == the eager model."""
    from fxport.runtime.generate import ExportedBackend

    model = tiny.model()
    with torch.no_grad():
        programs = export_methods(model, max_prefill_chunk=tiny.max_chunk)
    programs, _ = apply_method_passes(programs, cpu_passes(windows=sliding_window_buffers(model)))
    backend = ExportedBackend(programs, max_seq_len=tiny.max_seq_len, max_prefill_chunk=tiny.max_chunk)
    torch.manual_seed(4)
    tokens = torch.randint(0, model.config.vocab_size, (1, 13))
    want = _eager_steps(model, tokens, [4, 4])
    got = _pte_steps(backend, tokens, [4, 4])
    for step, (g, w) in enumerate(zip(got, want)):
        # fp32; the mean of RMSNorm is a dot product with 1/D, attention a matmul/softmax chain.
        err = (g - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item(), f"step {step}: max abs error {err}"


def test_a_foreign_tied_table_is_stored_once(tmp_path):
    """Not fxport's model: a plain float ``nn.Embedding`` tied to an ``nn.Linear`` head, one
    ``forward`` method. XNNPACK takes the linear (its own copy of the table) and leaves the
    gather, so :func:`shared_tables` finds the table and the weights go to a ``.ptd`` holding its
    bytes once; the program runs and matches eager (fp32, rel <= 1e-5)."""
    from torch import nn

    from executorch.runtime import Runtime
    from fxport.lowering.xnnpack import shared_tables

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(96, 32)
            self.mix = nn.Linear(32, 32)
            self.head = nn.Linear(32, 96, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mix(self.emb(ids))))

    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.tensor([[3, 95, 0, 41]])

    def program():
        return {"forward": torch.export.export(model, (ids,)).run_decompositions({})}

    assert shared_tables(program()) == ["forward: p_head_weight"]  # the tied table (export names it after the head)
    lowered = lower_to_xnnpack(program())
    out = tmp_path / "tied.pte"
    assert lowered.write(out) == [tmp_path / "tied.ptd"]
    table = model.emb.weight.detach().numpy().tobytes()
    assert (out.read_bytes().count(table), (tmp_path / "tied.ptd").read_bytes().count(table)) == (0, 1)
    assert lower_to_xnnpack(program(), weights_file=False).buffer.count(table) == 2

    method = Runtime.get().load_program(out, data_path=tmp_path / "tied.ptd").load_method("forward")
    got = method.execute([ids])[0]
    with torch.no_grad():
        want = model(ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
