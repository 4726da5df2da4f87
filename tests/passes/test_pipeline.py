"""passes.pipeline.apply, passes.match patterns, and the lazy passes package."""

import json

import pytest
import torch

from fxport.passes import PassError, PipelineError, apply, run_methods
from fxport.passes import match as M
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import call

aten = torch.ops.aten


class CacheScale(torch.nn.Module):
    """A cache written with in-place index_copy_ (training IR) and x * 2.0 on the output path."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 2, 8, 4))

    def forward(self, x, pos):  # x (1, 2, L, 4), pos (L,)
        self.k_cache.index_copy_(2, pos, x)
        return self.k_cache.sum(2) * 2.0


def _export():
    L = torch.export.Dim("L", min=2, max=8)
    return torch.export.export(CacheScale(), (torch.randn(1, 2, 3, 4), torch.arange(3)), dynamic_shapes=({2: L}, {0: L}))


MUL2 = M.P(aten.mul.Tensor, M.Any("x"), M.Const(2.0))


class MulToAdd(Pass):
    """x * 2.0 -> x + x (exact in fp32); records the method it saw."""

    def __init__(self):
        self.methods = []

    def run(self, ep, ctx):
        self.methods.append(ctx.method)
        stats = PassStats()
        for node, caps in M.find_all(ep.graph, MUL2):
            stats.matched += 1
            with ep.graph.inserting_before(node):
                new = call(ep.graph, aten.add.Tensor, caps["x"], caps["x"])
            node.replace_all_uses_with(new)
            ep.graph.erase_node(node)
            stats.rewritten += 1
        return PassResult(ep, stats.rewritten > 0, stats)


class Refuses(Pass):
    def run(self, ep, ctx):
        raise PassError("Refuses: nothing to do with buffer k_cache; pass refuse=False")


class Crashes(Pass):
    def run(self, ep, ctx):
        raise KeyError("oops")


def _ops(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_apply_normalizes_runs_in_order_and_is_exact():
    ep = _export()
    assert "aten.index_copy_.default" in _ops(ep)  # training IR in
    p1 = MulToAdd()
    res = apply(ep, [p1, MulToAdd()], method="decode", dump=False)
    ops = _ops(res.ep)
    assert "aten.index_copy.default" in ops and "aten.index_copy_.default" not in ops
    assert "aten.mul.Tensor" not in ops and "aten.add.Tensor" in ops
    assert [(r.index, r.name, r.changed) for r in res.records] == [(1, "mul_to_add", True), (2, "mul_to_add", False)]
    assert res.records[0].stats.as_dict() == {"matched": 1, "rewritten": 1, "skipped": {}, "sites": []}
    assert list(res.stats()) == ["mul_to_add", "mul_to_add#2"]
    assert p1.methods == ["decode"] and res.changed
    # Caller's program untouched; rewritten program numerically identical (x + x == 2x exactly).
    assert "aten.mul.Tensor" in _ops(ep)
    x, pos = torch.randn(1, 2, 5, 4), torch.arange(5)
    assert torch.equal(res.ep.module()(x, pos), ep.module()(x, pos))


def test_pass_error_propagates_unchanged():
    with pytest.raises(PassError, match=r"^Refuses: nothing to do with buffer k_cache; pass refuse=False$"):
        apply(_export(), [Refuses()], dump=False)


def test_crash_names_the_pass():
    with pytest.raises(PipelineError, match=r"^pass 02 crashes \(method=prefill\) failed: KeyError: 'oops'$"):
        apply(_export(), [MulToAdd(), Crashes()], method="prefill", dump=False)


def test_dump_files(tmp_path):
    res = apply(_export(), [MulToAdd(), MulToAdd()], method="prefill", dump=tmp_path)
    d = tmp_path / "prefill"
    assert res.dump_dir == d
    names = sorted(p.name for p in d.iterdir())
    expected = sorted(
        f"{i:02d}_mul_to_add.{ext}" for i in (1, 2) for ext in ("before.txt", "after.txt", "diff", "ops.txt", "stats.json")
    ) + ["pipeline.json"]
    assert names == expected
    before = (d / "01_mul_to_add.before.txt").read_text()
    after = (d / "01_mul_to_add.after.txt").read_text()
    assert "torch.ops.aten.mul.Tensor" in before and "torch.ops.aten.mul.Tensor" not in after
    assert "class GraphModule" in after and "# graph signature" in after
    diff = (d / "01_mul_to_add.diff").read_text()
    assert diff.startswith("--- 01_mul_to_add.before\n+++ 01_mul_to_add.after\n")
    assert any(l.startswith("-") and "aten.mul.Tensor" in l for l in diff.splitlines())
    assert any(l.startswith("+") and "aten.add.Tensor" in l for l in diff.splitlines())
    ops = (d / "01_mul_to_add.ops.txt").read_text().splitlines()
    assert ops[0].split() == ["before", "after", "delta", "op"]
    assert ops[1].split() == ["1", "0", "-1", "aten.mul.Tensor"]
    assert ops[2].split() == ["0", "1", "+1", "aten.add.Tensor"]
    stats = json.loads((d / "01_mul_to_add.stats.json").read_text())
    assert stats["pass"] == "mul_to_add" and stats["method"] == "prefill" and stats["changed"] is True
    assert stats["stats"] == {"matched": 1, "rewritten": 1, "skipped": {}, "sites": []}
    # The second (no-op) pass: before == after, empty diff, no op change.
    assert (d / "02_mul_to_add.diff").read_text() == ""
    assert (d / "02_mul_to_add.before.txt").read_text() == after
    summary = json.loads((d / "pipeline.json").read_text())
    assert [p["changed"] for p in summary["passes"]] == [True, False]


def test_dump_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPORT_DUMP", str(tmp_path / "env"))
    res = apply(_export(), [MulToAdd()])
    assert res.dump_dir == tmp_path / "env"
    assert (tmp_path / "env" / "01_mul_to_add.diff").exists()
    # dump=False wins over the environment.
    res = apply(_export(), [MulToAdd()], dump=False, method="decode")
    assert res.dump_dir is None and not (tmp_path / "env" / "decode").exists()


def test_run_methods_shares_passes():
    ep = _export()
    out = run_methods({"prefill": ep, "decode": ep}, [MulToAdd()], dump=False)
    assert [r.method for r in out.values()] == ["prefill", "decode"]
    assert all(r.records[0].changed for r in out.values())


def test_lazy_pass_imports():
    import fxport.passes as passes

    assert "FixedSlotFusion" in dir(passes)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        passes.Nope  # noqa: B018


# ----------------------------------------------------------------------------- match.py


def _aten_graph():
    class F(torch.nn.Module):
        def forward(self, tokens, e, feats):
            m = (tokens == 7).unsqueeze(-1).expand_as(e)
            return e.masked_scatter(m, feats), e * e

    ep = torch.export.export(F(), (torch.tensor([[7, 1]]), torch.randn(1, 2, 3), torch.randn(1, 3)))
    return ep.run_decompositions({}).graph


def test_pattern_captures_through_views():
    g = _aten_graph()
    eq = M.P(aten.eq.Scalar, M.Any("tokens"), M.Const(name="tid"))
    pat = M.P(aten.masked_scatter, M.Any("embeds"), M.Through((aten.unsqueeze, aten.expand), eq), M.Any("feats"))
    hits = list(M.find_all(g, pat))
    assert len(hits) == 1
    node, caps = hits[0]
    assert node.target is aten.masked_scatter.default
    assert caps["tid"] == 7 and caps["tokens"].name == "tokens" and caps["feats"].name == "feats"
    # Through with zero wrappers matches too; a wrong constant does not.
    eq_node = next(n for n in g.nodes if n.target is aten.eq.Scalar)
    assert M.match(M.Through(aten.unsqueeze, eq), eq_node) == {"tokens": caps["tokens"], "tid": 7}
    wrong = M.P(aten.masked_scatter, M.Any(), M.Through((aten.unsqueeze, aten.expand), M.P(aten.eq.Scalar, M.Any(), M.Const(8))))
    assert list(M.find_all(g, wrong)) == []


def test_pattern_repeated_capture_binds_same_node():
    g = _aten_graph()
    square = M.P(aten.mul.Tensor, M.Any("x"), M.Any("x"))
    (node, caps), = M.find_all(g, square)
    assert caps["x"].name == "e"
    # x * y does not match when the capture must repeat.
    mul = next(n for n in g.nodes if n.target is aten.mul.Tensor)
    assert M.match(M.P(aten.mul.Tensor, M.Any("x"), M.Const(name="x")), mul) is None
    assert M.match(M.Or(M.P(aten.add.Tensor), M.P(aten.mul, name="m")), mul) == {"m": mul}


def test_is_op_and_producers_through():
    g = _aten_graph()
    ms = next(n for n in g.nodes if M.is_op(n, aten.masked_scatter))
    assert M.is_op(ms, aten.masked_scatter.default) and not M.is_op(ms, aten.mul) and not M.is_op(3, aten.mul)
    src, chain = M.producers_through(ms.args[1], (aten.expand, aten.unsqueeze))
    assert M.is_op(src, aten.eq.Scalar)
    assert [n.target for n in chain] == [aten.expand.default, aten.unsqueeze.default]
    assert M.P(aten.expand, exact=True).match(chain[0], {}) is False  # expand has 2 args


def test_functional_program_is_not_retraced():
    ep = _export().run_decompositions({})

    class NoOp(Pass):
        def run(self, ep, ctx):
            return PassResult(ep, False, PassStats())

    assert apply(ep, [NoOp()], dump=False).ep is ep


def test_ancestors_and_descendants():
    g = _aten_graph()
    by_name = {n.name: n for n in g.nodes}
    ms = next(n for n in g.nodes if M.is_op(n, aten.masked_scatter))
    eq = next(n for n in g.nodes if M.is_op(n, aten.eq.Scalar))
    assert {n.name for n in M.ancestors([ms])} >= {"tokens", "e", "feats", eq.name}
    assert by_name["tokens"] not in M.ancestors([ms], stop=[eq])
    down = M.descendants([eq])
    assert ms in down and eq not in down and not any(M.is_op(n, aten.mul) for n in down)
    assert M.descendants([eq], stop=[ms]) == {n for n in down if n is not ms and n.op != "output"}


class _Holder:  # like transformers' Cache object: not a module, holds the buffer tensor
    def __init__(self, t):
        self.keys = t


class AliasedCache(torch.nn.Module):
    """A buffer also reached through a plain object: non-strict export lifts it a second time."""

    def __init__(self):
        super().__init__()
        self.holder = _Holder(torch.zeros(1, 2, 8, 4))
        self.register_buffer("key_cache", self.holder.keys, persistent=False)

    def forward(self, x, pos):
        self.holder.keys.index_copy_(2, pos, x)
        return self.holder.keys.sum(2)


def test_aliased_constant_folds_into_buffer():
    from torch.export.graph_signature import InputKind, OutputKind

    x, pos = torch.randn(1, 2, 3, 4), torch.arange(3)
    ep = torch.export.export(AliasedCache(), (x, pos), strict=False)
    kinds = [s.kind for s in ep.graph_signature.input_specs]
    # The alias, as in transformers' static-cache exports; run_decompositions alone raises
    # "expected compiled_fn to be GraphModule" on it (torch 2.13).
    assert InputKind.CONSTANT_TENSOR in kinds
    res = apply(ep, [], dump=False)
    specs = res.ep.graph_signature
    assert [s.kind for s in specs.input_specs] == [InputKind.BUFFER, InputKind.USER_INPUT, InputKind.USER_INPUT]
    assert [(s.kind, s.target) for s in specs.output_specs][0] == (OutputKind.BUFFER_MUTATION, "key_cache")
    expected = torch.zeros(1, 2, 8, 4).index_copy_(2, pos, x).sum(2)
    assert torch.equal(res.ep.module()(x, pos), expected)


def test_pass_names_keep_acronyms():
    from fxport.passes.pipeline import pass_name

    class RingBufferKVCache(Pass):
        pass

    class SDPADispatch(Pass):
        pass

    class Int4Dispatch(Pass):
        pass

    class Named(Pass):
        name = "custom"

    assert [pass_name(p()) for p in (RingBufferKVCache, SDPADispatch, Int4Dispatch, MulToAdd, Named)] == [
        "ring_buffer_kv_cache",
        "sdpa_dispatch",
        "int4_dispatch",
        "mul_to_add",
        "custom",
    ]


def test_failing_pass_leaves_error_dump(tmp_path):
    with pytest.raises(PassError):
        apply(_export(), [MulToAdd(), Refuses()], dump=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "02_refuses.before.txt" in names and "02_refuses.error.txt" in names and "pipeline.json" not in names
    assert (tmp_path / "02_refuses.before.txt").read_text() == (tmp_path / "01_mul_to_add.after.txt").read_text()
    error = (tmp_path / "02_refuses.error.txt").read_text()
    assert error.startswith("Traceback") and error.rstrip().endswith(
        "PassError: Refuses: nothing to do with buffer k_cache; pass refuse=False"
    )
