"""fxport.builder.speedups: one switch, the same bytes either way, probes that fall back, and
nothing left patched or registered once a scope closes.

* the shipped ``balanced`` recipe on the real Gemma 3 270M GGUF cut to its first layer
  (``Source(layers=1)``; the whole model builds in ~1 min with the speedups, ~4 min without):
  built with the speedups (through the quantize stage, as ``fxport export`` does) and without
  them (from the same quantized model): the same ``.pte`` and ``.ptd`` bytes;
* a tiny 8da4w program lowered both ways: the same bytes and report; what fewer_retraces skipped;
* an upstream symbol a speedup probes taken away (or a new pass hook added): one warning, that
  speedup off, the other three on, the same bytes as the default build;
* every patched attribute is the original after the scopes, also after an exception inside them,
  and torchao's quant ops have their own kernel alone again (also under a fake mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fxport.builder import BuildOptions, Source, build, speedups
from fxport.builder.speedups import SpeedupUnavailable
from fxport.builder.speedups import quant_shape_rules as rules

TINY = Source(preset="tiny-gemma3", layers=1)
TINY_OPTS = dict(max_seq_len=16, max_prefill_chunk=5)


def _files(result) -> list[bytes]:
    return [p.read_bytes() for p in (result.out, *result.extra_files)]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Warnings of this test only (the module warns once per process and reason)."""
    monkeypatch.setattr(speedups, "_warned", set())


# ----------------------------------------------------------------------------- the same bytes


@pytest.mark.slow
def test_balanced_on_the_real_gguf_writes_the_same_bytes_with_and_without_speedups(tmp_path):
    from fxport.models.gemma4.load import gemma3_270m_gguf
    from fxport.models.gemma4.tokenizer import load_tokenizer

    options = dict(max_seq_len=64, max_prefill_chunk=16)
    fast = build(Source(gguf=gemma3_270m_gguf(), layers=1), tmp_path / "fast.pte",
                 BuildOptions(quant="balanced", speedups=True, **options))
    assert fast.speedups == {"off": {}, "skipped": fast.speedups["skipped"]}
    assert len(fast.extra_files) == 1  # the balanced lookup reads the head's codes: a .ptd
    tokenizer = load_tokenizer(fast.tokenizer_dir)
    # The quantize stage is the same code either way (no speedup runs in it): the plain build
    # starts from the model the fast build quantized, which saves ~15 s of this test.
    plain = build(Source(model=fast.model, tokenizer=tokenizer), tmp_path / "plain.pte",
                  BuildOptions(quant=None, speedups=False, **options))
    assert plain.speedups == {}
    a, b = _files(fast), _files(plain)
    assert [len(x) for x in a] == [len(x) for x in b]
    assert a == b


def test_a_lowering_writes_the_same_program_with_and_without_speedups(tmp_path):
    """8da4w (the dq-linear passes run), lowered by ExecuTorch's own path and with the speedups:
    byte for byte, the same delegation report. fewer_retraces ran one whole-program re-export per
    method (the first; it orders the constants) and skipped the others. EdgeDecompositions (the
    decompositions written node by node instead of whole-program re-exports) gives the same
    logits, bit for bit, over prefill chunks and decode steps."""
    from fxport.contract import runner_metadata
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes, lower_to_xnnpack, quantize_for_xnnpack
    from fxport.models.gemma4.config import SLIDING, get_preset
    from fxport.models.gemma4.export import export_methods
    from fxport.models.gemma4.model import Gemma4ForCausalLM, sliding_window_buffers
    from fxport.passes.edge_decompositions import EdgeDecompositions
    from fxport.runtime.pte_backend import PteBackend

    config = get_preset("tiny-gemma3").replace(num_hidden_layers=1, layer_types=[SLIDING])  # 1 layer: the test's cost
    chunk, positions = 5, 16
    metadata = runner_metadata(max_prefill_chunk=chunk, max_context_len=positions, eos_ids=[1], vocab_size=256, bos_id=2)

    def lower(on: bool, edge_decompositions: bool = True):
        torch.manual_seed(0)
        model = Gemma4ForCausalLM(config, max_seq_len=positions).eval()
        quantize_for_xnnpack(model, "8da4w")
        with speedups.enabled(on) as fast, fast.fake_propagation():  # the scopes builder.build opens
            with torch.no_grad():
                programs = export_methods(model, max_prefill_chunk=chunk)
            passes = {m: [p for p in ps if edge_decompositions or not isinstance(p, EdgeDecompositions)]
                      for m, ps in cpu_passes(windows=sliding_window_buffers(model)).items()}
            with fast.codegen():
                programs, _ = apply_method_passes(programs, passes)
                with fast.lowering():
                    lowered = lower_to_xnnpack(programs, constant_methods=metadata)
        return lowered, fast.skipped

    plain, nothing = lower(False)
    fast, skipped = lower(True)
    assert nothing == {}
    assert fast.report.summary() == plain.report.summary()
    assert fast.buffer == plain.buffer
    # per method (prefill, decode): the first re-export of the program ran, the other two were
    # skipped; what else ran were XNNPACK's own SDPA pattern graphs (6 nodes each)
    assert len([n for n in skipped["run_decompositions ran"] if n >= 10]) == 2
    assert skipped["run_decompositions"] >= 2 * 2 and skipped["retrace"] > 0

    whole, _ = lower(True, edge_decompositions=False)  # the program decomposed by ExecuTorch
    assert whole.report.summary() == plain.report.summary()
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for name, program in (("whole", whole), ("fast", fast)):
        backend = PteBackend(program.save(tmp_path / f"{name}.pte"))
        steps, pos = [], 0
        for n in (5, 3):
            steps.append(backend.prefill(tokens[:, pos:pos + n], torch.arange(pos, pos + n))[:, -1])
            pos += n
        for p in range(pos, tokens.shape[1]):
            steps.append(backend.decode(tokens[:, p:p + 1], torch.tensor([p]))[:, -1])
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])


# ----------------------------------------------------------------------------- probes


def test_a_probed_symbol_taken_away_turns_that_speedup_off_with_one_warning(tmp_path, monkeypatch, fresh_warnings):
    import executorch.exir.passes.dim_order_ops_registry as registry

    default = build(TINY, tmp_path / "default.pte", BuildOptions(**TINY_OPTS))
    monkeypatch.delattr(registry, "MemoryFormatOpsMap")  # read by fewer_retraces' DimOrderOpsRevert check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = build(TINY, tmp_path / "plain.pte", BuildOptions(**TINY_OPTS))
        with speedups.enabled(True) as again:  # the next build: the same mismatch, no second warning
            pass
    ours = [w for w in caught if issubclass(w.category, SpeedupUnavailable)]
    reason = "executorch.exir.passes.dim_order_ops_registry:MemoryFormatOpsMap is missing"
    assert [str(w.message) for w in ours] == [
        f"fxport speedup fewer_retraces is off: {reason}; the build runs ExecuTorch's plain path there "
        "(the same program, slower)"]
    assert plain.speedups == {"off": {"fewer_retraces": reason}, "skipped": {}} and again.off == plain.speedups["off"]
    assert default.speedups["skipped"]["retrace"] > 0  # the default build ran it
    assert _files(plain) == _files(default)


def test_a_new_pass_hook_upstream_turns_fewer_retraces_off(monkeypatch, fresh_warnings):
    from executorch.exir.pass_base import ExportPass

    monkeypatch.setattr(ExportPass, "call_custom", lambda self, *args: None, raising=False)
    with pytest.warns(SpeedupUnavailable, match=r"fewer_retraces is off: executorch\.exir\.pass_base:ExportPass "
                                                r"methods changed: new call_custom;"):
        with speedups.enabled(True) as fast:
            pass
    assert fast.off == {"fewer_retraces": "executorch.exir.pass_base:ExportPass methods changed: new call_custom"}
    assert [fast.usable(name) for name in speedups.SPEEDUPS] == [True, True, False, True]


def test_every_probe_passes_on_the_pinned_upstream_versions():
    assert {name: speedups.probe(name) for name in speedups.SPEEDUPS} == dict.fromkeys(speedups.SPEEDUPS)


# ----------------------------------------------------------------------------- nothing outlives a scope

OPS = ("choose_qparams_affine", "quantize_affine", "dequantize_affine")


def _current(owner, name):
    return vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)


def _fake_dequantize():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        w = mode.from_tensor(torch.zeros(4, 8, dtype=torch.int8))
        return torch.ops.torchao.dequantize_affine(w, [1, 8], torch.ones(4, 1), None, torch.int8, -8, 7)


@pytest.mark.parametrize("fail", [False, True], ids=["exit", "exception"])
def test_every_patch_is_undone_when_the_scopes_close(fail, monkeypatch):
    import torchao.quantization.quant_primitives  # noqa: F401  (defines the ops)

    originals = [(owner, name, _current(owner, name)) for owner, name in speedups.patched()]
    dumps = {op: torch._C._dispatch_dump(f"torchao::{op}") for op in OPS}
    inside = []
    try:
        with speedups.enabled(True) as fast, fast.fake_propagation(), fast.codegen(), fast.lowering():
            inside = [_current(owner, name) is value for owner, name, value in originals]
            assert rules.registered() and torch._C._dispatch_dump("torchao::dequantize_affine") != dumps["dequantize_affine"]
            if fail:
                raise RuntimeError("inside the scopes")
    except RuntimeError as exc:
        assert fail and str(exc) == "inside the scopes"
    assert len(originals) == 12 and not any(inside)  # every one was patched inside
    assert all(_current(owner, name) is value for owner, name, value in originals)
    assert not rules.registered()
    assert {op: torch._C._dispatch_dump(f"torchao::{op}") for op in OPS} == dumps
    # under a fake mode too (torch keeps a per-key Python kernel there): torchao's own kernel runs
    calls = []
    monkeypatch.setattr(rules, "_fake_only", lambda t: calls.append(t) or False)
    assert tuple(_fake_dequantize().shape) == (4, 8) and calls == []


def test_speedups_off_patch_nothing():
    originals = [(owner, name, _current(owner, name)) for owner, name in speedups.patched()]
    with speedups.enabled(False) as fast, fast.fake_propagation(), fast.codegen(), fast.lowering():
        assert all(_current(owner, name) is value for owner, name, value in originals)
        assert not rules.registered()
    assert fast.off == {} and fast.skipped == {}
