"""fewer_retraces: ExecuTorch's edge passes fused into fewer re-traces give the graph the passes
give one by one (the end-to-end check, the same .pte bytes as ExecuTorch's own path, is
tests/lowering/test_xnnpack.py::test_fewer_retraces_write_the_same_program)."""

from __future__ import annotations

import torch

from fxport.builder.speedups.fewer_retraces import _graph_fingerprint, fuse_passes, fusable


class Mixed(torch.nn.Module):
    """Ops each fused pass rewrites: ``t`` (NormalizeTranspose), python scalars where the schema
    wants a tensor (ScalarToTensor), an int tensor times a float one (RemoveMixedTypeOperators)."""

    def forward(self, x, i):  # x (4, 3) float, i (4, 3) int64
        y = torch.ops.aten.t.default(x)  # (3, 4)
        z = torch.ops.aten.add.Tensor(x, 2.0)
        w = torch.ops.aten.mul.Tensor(i, x)
        return y, z * 0.5, w


def _edge_passes():
    from executorch.exir.passes import base_pre_op_replace_passes
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
    from executorch.exir.passes.replace_aten_with_edge_pass import OpReplacePass

    return [*base_pre_op_replace_passes, RemoveMixedTypeOperators(), OpReplacePass()]


def _run(passes, gm):
    for p in passes:
        gm = p(gm).graph_module
    return gm


def test_the_pre_op_passes_fuse_into_runs():
    fused = fuse_passes(_edge_passes())
    names = [repr(p) if type(p).__name__ == "FusedPasses" else getattr(p, "__name__", type(p).__name__) for p in fused]
    assert names == [
        "ReplaceSymSizeOpPass",
        "FusedPasses(NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, ScalarToTensorPass, SymToTensorPass)",
        "RemoveNoopPass", "PruneEmptyTensorsPass", "RemoveToCopyPass", "FoldRedundantDequantizeQuantizePass",
        "FusedPasses(RemoveMixedTypeOperators, OpReplacePass)",
    ]
    assert not fusable(fused[2].__wrapped__)  # an in-place pass stays on its own


def test_fused_passes_write_the_graph_the_passes_write_one_by_one():
    example = (torch.randn(4, 3), torch.arange(12).reshape(4, 3))
    ep = torch.export.export(Mixed(), example).run_decompositions({})
    one_by_one = _run(_edge_passes(), torch.fx.GraphModule(ep.graph_module, ep.graph_module.graph))
    ep = torch.export.export(Mixed(), example).run_decompositions({})
    fused = _run(fuse_passes(_edge_passes()), torch.fx.GraphModule(ep.graph_module, ep.graph_module.graph))
    assert _graph_fingerprint(fused) == _graph_fingerprint(one_by_one)
    from executorch.exir.dialects.edge._ops import EdgeOpOverload

    calls = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert all(isinstance(t, EdgeOpOverload) for t in calls), calls  # OpReplace ran last, on every op
    ops = {str(t._op) for t in calls}
    assert "aten.t_copy.default" in ops  # NormalizeTranspose ran before it
    assert "aten._to_copy.default" in ops  # RemoveMixedTypeOperators cast the int operand
    for want, got in zip(one_by_one(*example), fused(*example)):
        assert torch.equal(want, got)


class Views(torch.nn.Module):
    def forward(self, x):  # x (2, 3, 4)
        a = x.view(6, 4)
        b = x.transpose(0, 1).reshape(3, 8)  # export: permute, clone, _unsafe_view
        return a.unsqueeze(0), b.select(0, 1), x.expand(2, 2, 3, 4)


def test_view_copy_in_place_swaps_what_torchs_pass_swaps():
    from torch._export.passes import ReplaceViewOpsWithViewCopyOpsPass

    from fxport.builder.speedups.fewer_retraces import _ViewCopyInPlace

    def targets(swap):
        ep = torch.export.export(Views(), (torch.randn(2, 3, 4),)).run_decompositions({})
        gm = swap(torch.fx.GraphModule(ep.graph_module, ep.graph_module.graph)).graph_module
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    ours, torchs = targets(_ViewCopyInPlace()), targets(ReplaceViewOpsWithViewCopyOpsPass())
    assert ours == torchs
    assert {"aten.view_copy.default", "aten.unsqueeze_copy.default", "aten.select_copy.int",
            "aten.expand_copy.default"} <= set(ours)
