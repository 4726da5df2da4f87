"""Int4Dispatch: torchao int4 and fxport QuantizedLinear patterns -> int4_gemv (decode) or
int4_dequant + linear (prefill), run on CPU through the reference impls.

References are independent of the pass: torchao's own dequantized weight (``weight.dequantize()``)
fed to ``F.linear``, and the unrewritten exported program.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from fxport.passes.base import PassContext
from fxport.passes.graph import to_functional
from fxport.passes.int4_dispatch import Int4Dispatch, module_fqn
from fxport.quant.linear import QuantizedLinear, to_quantized_linears
from fxport.quant.quantize import quantize_hqq

torchao_q = pytest.importorskip("torchao.quantization")
from torchao.quantization.granularity import PerGroup  # noqa: E402

aten = torch.ops.aten
GEMV = torch.ops.fxport.int4_gemv.default
DEQUANT = torch.ops.fxport.int4_dequant.default
TORCHAO_DEQUANT = torch.ops.torchao.dequantize_affine.default


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 96)  # with bias
        self.down = torch.nn.Linear(96, 32, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _reference(model, x):  # torchao's dequantized weights + dense linear
    h = F.linear(x, model.up.weight.dequantize(), model.up.bias)
    return F.linear(F.gelu(h), model.down.weight.dequantize())


def _ops(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def torchao_programs():
    torch.manual_seed(0)
    model = Toy()
    torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    decode = to_functional(torch.export.export(model, (torch.randn(1, 1, 64),)))
    prefill = to_functional(
        torch.export.export(model, (torch.randn(1, 8, 64),), dynamic_shapes=({1: Dim("L", max=64)},))
    )
    return model, decode, prefill


def test_decode_uses_gemv_and_matches_reference(torchao_programs):
    model, decode, _ = torchao_programs
    res = Int4Dispatch()(decode, PassContext("decode"))
    ops = _ops(res.ep)
    assert ops.count(GEMV) == 2 and TORCHAO_DEQUANT not in ops and aten.linear.default not in ops
    assert ops.count(aten.add.Tensor) == 1  # the bias of `up`
    assert (res.stats.matched, res.stats.rewritten) == (2, 2)
    assert [s["choice"] for s in res.stats.sites] == ["gemv", "gemv"]
    x = torch.randn(1, 1, 64)
    torch.testing.assert_close(res.ep.module()(x), _reference(model, x), rtol=1e-5, atol=1e-5)  # fp32 sum order


def test_prefill_uses_dequant_mm_bit_identical(torchao_programs):
    model, _, prefill = torchao_programs
    res = Int4Dispatch()(prefill, PassContext("prefill"))
    ops = _ops(res.ep)
    assert ops.count(DEQUANT) == 2 and ops.count(aten.linear.default) == 2 and TORCHAO_DEQUANT not in ops
    for L in (1, 5, 64):
        x = torch.randn(1, L, 64)
        assert torch.equal(res.ep.module()(x), prefill.module()(x))  # same dequant formula: exact
        torch.testing.assert_close(res.ep.module()(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_methods_share_packed_constants(torchao_programs):
    _, decode, prefill = torchao_programs
    d = Int4Dispatch()(decode, PassContext("decode")).ep
    p = Int4Dispatch()(prefill, PassContext("prefill")).ep
    names = [f"{m}.weight_{part}" for m in ("up", "down") for part in ("packed", "scales", "zeros")]
    assert sorted(d.constants) == sorted(p.constants) == sorted(names)
    for name in names:
        assert torch.equal(d.constants[name], p.constants[name])
    assert d.constants["up.weight_packed"].shape == (96, 32) and d.constants["up.weight_packed"].dtype == torch.uint8
    assert sorted(d.state_dict) == sorted(p.state_dict) == ["up.bias"]  # int8 qdata removed


def test_idempotent(torchao_programs):
    _, decode, prefill = torchao_programs
    for method, ep in (("decode", decode), ("prefill", prefill)):
        once = Int4Dispatch()(ep, PassContext(method))
        twice = Int4Dispatch()(once.ep, PassContext(method))
        assert once.changed and not twice.changed
        assert str(twice.ep.graph) == str(once.ep.graph)


def test_unknown_method_dispatches_on_static_m():
    torch.manual_seed(0)
    model = Toy()
    torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    for m, limit, want in ((2, 4, GEMV), (5, 4, DEQUANT), (5, 8, GEMV)):
        ep = to_functional(torch.export.export(model, (torch.randn(1, m, 64),)))
        res = Int4Dispatch(decode_max_m=limit)(ep)
        assert want in _ops(res.ep), (m, limit)
        x = torch.randn(1, m, 64)
        torch.testing.assert_close(res.ep.module()(x), _reference(model, x), rtol=1e-5, atol=1e-5)
    assert res.stats.sites[0]["reason"] == "M = 5 <= 8"


def test_fxport_quantized_linear_pattern():
    torch.manual_seed(0)
    model = Toy()
    qws = {f"{n}.weight": quantize_hqq(getattr(model, n).weight, 4, 32) for n in ("up", "down")}
    assert to_quantized_linears(model, qws) == ["up", "down"]
    assert isinstance(model.up, QuantizedLinear)
    decode = to_functional(torch.export.export(model, (torch.randn(1, 1, 64),)))
    prefill = to_functional(torch.export.export(model, (torch.randn(1, 8, 64),), dynamic_shapes=({1: Dim("L", max=64)},)))
    assert _ops(decode).count(DEQUANT) == 2

    d = Int4Dispatch()(decode, PassContext("decode"))
    assert _ops(d.ep).count(GEMV) == 2 and DEQUANT not in _ops(d.ep)
    x = torch.randn(1, 1, 64)
    ref = F.linear(F.gelu(F.linear(x, qws["up.weight"].dequantize(), model.up.bias)), qws["down.weight"].dequantize())
    torch.testing.assert_close(d.ep.module()(x), ref, rtol=1e-5, atol=1e-5)
    assert sorted(d.ep.state_dict) == sorted(prefill.state_dict)  # the same buffers, read by the GEMV

    p = Int4Dispatch()(prefill, PassContext("prefill"))
    assert not p.changed and p.stats.matched == 2  # already dequant + mm


def test_int8_dequant_is_skipped_with_reason():
    model = Toy()
    torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerGroup(32)))
    ep = to_functional(torch.export.export(model, (torch.randn(1, 1, 64),)))
    res = Int4Dispatch()(ep, PassContext("decode"))
    assert not res.changed
    assert dict(res.stats.skipped) == {"dequantize_affine is not int4 (int8 storage, range [-8, 7])": 2}


def test_module_fqn():
    assert module_fqn("model.layers.0.mlp.up_proj.parametrizations.weight.original0") == "model.layers.0.mlp.up_proj"
    assert module_fqn("lm_head.weight") == "lm_head"


def test_gemma_tiny_prefill_and_decode():
    """Real model: tiny Gemma 3 config (2 layers), torchao int4 on every linear with K % 32 == 0."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.export import export_methods
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    cfg = dataclasses.replace(get_preset("tiny-gemma3"), num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(cfg, max_seq_len=16, max_batch_size=1).eval()
    torchao_q.quantize_(
        model,
        torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and ".layers." in fqn and mod.in_features % 32 == 0,
    )
    eps = export_methods(model, max_prefill_chunk=8)
    out = {k: Int4Dispatch()(ep, PassContext(k)) for k, ep in eps.items()}
    assert out["prefill"].stats.rewritten == out["decode"].stats.rewritten == 14  # 7 linears x 2 layers
    assert sorted(out["prefill"].ep.constants) == sorted(out["decode"].ep.constants)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        ref_prefill = model(tokens, torch.arange(6))
        ref_decode = model(tokens[:, :1] + 1, torch.tensor([6]))
    prefill, decode = out["prefill"].ep.module(), out["decode"].ep.module()
    # One module per method, each with its own cache: run the decode method on a prefilled copy.
    got_prefill = prefill(tokens, torch.arange(6))
    torch.testing.assert_close(got_prefill, ref_prefill, rtol=0, atol=0)  # dequant + linear: exact
    decode.load_state_dict(prefill.state_dict(), strict=False)  # carries the written KV caches
    torch.testing.assert_close(decode(tokens[:, :1] + 1, torch.tensor([6])), ref_decode, rtol=1e-4, atol=1e-4)


def test_bf16_asymmetric_zero_points():
    """Asymmetric torchao int4 (non-zero int8 zero points, bf16 scales, bf16 model)."""
    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    torchao_q.quantize_(
        model,
        torchao_q.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=torchao_q.MappingType.ASYMMETRIC
        ),
    )
    assert bool((model.up.weight.zero_point != 0).any())
    ep = to_functional(torch.export.export(model, (torch.randn(1, 1, 64, dtype=torch.bfloat16),)))
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    prefill = Int4Dispatch()(ep, PassContext("prefill")).ep
    assert torch.equal(prefill.module()(x), ep.module()(x))  # bf16 dequant identical to torchao's
    decode = Int4Dispatch()(ep, PassContext("decode")).ep
    assert prefill.constants["up.weight_zeros"].dtype == torch.bfloat16
    # fp32-accumulated GEMV vs bf16 linear: within a few bf16 ulps of outputs of magnitude ~1
    torch.testing.assert_close(decode.module()(x).float(), ep.module()(x).float(), rtol=2e-2, atol=2e-2)


def test_pipeline_dump_and_saved_program(torchao_programs, tmp_path):
    """Through fxport.passes.run_methods (per-method context, dumps) and torch.export.save/load."""
    import json

    from fxport.passes import run_methods

    _, decode, prefill = torchao_programs
    out = run_methods({"prefill": prefill, "decode": decode}, [Int4Dispatch()], dump=tmp_path)
    stats = {m: json.loads(next((tmp_path / m).glob("*int4_dispatch*.stats.json")).read_text()) for m in out}
    assert [s["choice"] for s in stats["decode"]["stats"]["sites"]] == ["gemv", "gemv"]
    assert [s["choice"] for s in stats["prefill"]["stats"]["sites"]] == ["dequant", "dequant"]
    path = tmp_path / "decode.pt2"
    torch.export.save(out["decode"].ep, path)
    loaded = torch.export.load(path)
    x = torch.randn(1, 1, 64)
    assert torch.equal(loaded.module()(x), out["decode"].ep.module()(x))
    assert torch.equal(loaded.constants["up.weight_packed"], out["decode"].ep.constants["up.weight_packed"])


def _structure(ep):
    """What must not depend on weight values: the graph text, the input specs and every
    constant's / parameter's shape and dtype."""
    tensors = {**ep.state_dict, **ep.constants}
    return (
        str(ep.graph),
        [(s.kind, s.target) for s in ep.graph_signature.input_specs],
        {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()},
    )


class Twice(torch.nn.Module):
    """One linear called twice: two dequant sites add the same packed constants."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.up(F.gelu(self.up(x)))


@pytest.mark.parametrize("method,model_cls", [("decode", Toy), ("prefill", Toy), ("decode", Twice)])
def test_meta_weights_give_the_real_graph(method, model_cls):
    """The CUDA dry run's model lives on the meta device (no values): same rewrite, same graph,
    the skipped range check counted per site."""
    from fxport.passes.int4_dispatch import META_RANGE_UNCHECKED

    programs = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls()
        torchao_q.quantize_(model, torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
        x = torch.randn(1, 1 if method == "decode" else 8, 64, device=device)
        dyn = None if method == "decode" else ({1: Dim("L", max=64)},)
        programs[device] = to_functional(torch.export.export(model, (x,), dynamic_shapes=dyn))
    real = Int4Dispatch()(programs["cpu"], PassContext(method))
    meta = Int4Dispatch()(programs["meta"], PassContext(method))
    assert all(t.is_meta for t in meta.ep.constants.values()) and meta.ep.constants
    assert _structure(meta.ep) == _structure(real.ep)
    assert (meta.stats.matched, meta.stats.rewritten) == (real.stats.matched, real.stats.rewritten) == (2, 2)
    assert dict(real.stats.skipped) == {}
    assert dict(meta.stats.skipped) == {META_RANGE_UNCHECKED: 2}
    assert [s.get("range_checked", True) for s in meta.stats.sites] == [False, False]
    assert [s["choice"] for s in meta.stats.sites] == [s["choice"] for s in real.stats.sites]
    again = Int4Dispatch()(meta.ep, PassContext(method))  # idempotent on meta too
    assert not again.changed
