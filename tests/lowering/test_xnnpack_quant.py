"""XNNPACK recipes: exact selection (which linear gets what), and one tiny .pte per new
recipe family checked against the eager torchao emulation.

The .pte test uses a 3-layer tiny model with the ``fast`` recipe: no layer falls in
``FAST_8BIT_LAYERS`` (3, 5, 11, 17), so every MLP and q/k/o takes int4 g32 HQQ, v_proj and the
head int8, the embedding lookup from the head's codes (weights in a ``.ptd``): every form
``balanced`` uses too (int8 linears, the shared lookup) plus the int4 one, in one program.
"""

from __future__ import annotations

import pytest
import torch

from fxport.lowering.xnnpack_quant import (
    DEFAULT_RECIPE,
    FAST_RECIPE,
    INT4_G32,
    INT4_G32_HQQ,
    INT8_PC,
    XNNPACK_RECIPES,
    quantize_for_xnnpack,
    recipe_names,
)
from fxport.models.gemma4.model import sliding_window_buffers
from fxport.tests.lowering.helpers import lower_fast
from fxport.quant.embedding import QuantizedEmbedding

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_recipe_names():
    assert recipe_names() == ["8da4w", "8da4w-head8", "8da8w", "balanced", "compact", "default", "fast", "sensitive"]
    assert DEFAULT_RECIPE.name == "balanced" and FAST_RECIPE.name == "fast"


def test_fast_rules_on_the_270m_names():
    """Which weight of the 18-layer model gets what, rule by rule."""
    r = XNNPACK_RECIPES["fast"]
    assert r.pick("lm_head.weight") == INT8_PC
    for i in range(18):
        for lin in LINEARS:
            got = r.pick(f"model.layers.{i}.{lin}.weight")
            want = INT8_PC if (i in (3, 5, 11, 17) or lin == "self_attn.v_proj") else INT4_G32_HQQ
            assert got == want, (i, lin, got)
    assert r.embedding is None and r.lookup_from_head
    assert XNNPACK_RECIPES["balanced"].pick("model.layers.7.mlp.down_proj.weight") == INT8_PC
    assert XNNPACK_RECIPES["balanced"].embedding is None and XNNPACK_RECIPES["balanced"].lookup_from_head
    assert XNNPACK_RECIPES["compact"].embedding == (4, 64)
    assert XNNPACK_RECIPES["compact"].pick("lm_head.weight") == INT8_PC
    assert XNNPACK_RECIPES["8da4w-head8"].pick("lm_head.weight") == INT8_PC
    assert XNNPACK_RECIPES["8da4w-head8"].pick("model.layers.0.mlp.up_proj.weight") == INT4_G32
    assert XNNPACK_RECIPES["8da8w"].embedding is None


def _tiny3(tiny):
    from fxport.models.gemma4.config import FULL, SLIDING
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    cfg = tiny.config().replace(num_hidden_layers=3, layer_types=[SLIDING, FULL, SLIDING])
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(cfg, max_seq_len=tiny.max_seq_len).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    return model


def test_quantize_for_xnnpack_reports_every_linear(tiny):
    model = _tiny3(tiny)
    report = quantize_for_xnnpack(model, "fast")
    want = {"lm_head": "8da8w per-channel"}
    for i in range(3):
        for lin in LINEARS:
            int8 = lin == "self_attn.v_proj"  # layers 0-2: none of FAST_8BIT_LAYERS
            want[f"model.layers.{i}.{lin}"] = "8da8w per-channel" if int8 else "8da4w g32 hqq"
    assert report.quantized == want
    assert report.kept_float == {}
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and (emb.bits, emb.group_size) == (8, emb.embedding_dim)
    assert emb.codes.data_ptr() == model.lm_head.weight.qdata.data_ptr()  # the head's own codes
    assert model.lm_head.weight is not None and not hasattr(model.model.embed_tokens, "weight")

    m2 = _tiny3(tiny)
    rep2 = quantize_for_xnnpack(m2, "balanced")
    assert set(rep2.quantized.values()) == {"8da8w per-channel"} and len(rep2.quantized) == 3 * 7 + 1
    assert rep2.embedding.startswith("model.embed_tokens int8 per-row")
    emb2 = m2.model.embed_tokens
    assert isinstance(emb2, QuantizedEmbedding) and (emb2.bits, emb2.group_size) == (8, emb2.embedding_dim)


def test_fast_pte_matches_eager(tiny, tmp_path):
    """prefill (chunks) + decode logits of the .pte vs the eager quantized model.

    Tolerance: max |diff| <= 2% of the eager logits' max |value| at every step. XNNPACK's
    int8 dynamic activations round differently from torchao's emulation, so the two are not
    bit-equal; the weight-only int8 config DESIGN notes returns errors ~1000x the logits, far
    outside this bound.
    """
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
    from fxport.models.gemma4.export import export_methods
    from fxport.runtime.pte_backend import PteBackend

    model = _tiny3(tiny)
    quantize_for_xnnpack(model, "fast")
    with torch.no_grad():
        programs = export_methods(model, max_prefill_chunk=tiny.max_chunk)
    programs, _ = apply_method_passes(programs, cpu_passes(windows=sliding_window_buffers(model)))
    lowered = lower_fast(programs, constant_methods=tiny.metadata())
    ops = {str(n.target) for n in _nodes(lowered)}
    assert any("embedding_byte" in t for t in ops), sorted(ops)
    assert lowered.shared  # the lookup reads the head's table: weights in a .ptd
    path = lowered.save(tmp_path / "fast.pte")
    backend = PteBackend(path)

    tokens = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    chunks = (5,)
    model.reset_caches()
    worst = 0.0
    with torch.no_grad():
        pos = 0
        for n in chunks:
            want = model(tokens[:, pos:pos + n], torch.arange(pos, pos + n))[:, -1]
            got = backend.prefill(tokens[:, pos:pos + n], torch.arange(pos, pos + n))[:, -1]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            pos += n
        for p in range(pos, tokens.shape[1]):
            want = model(tokens[:, p:p + 1], torch.tensor([p]))[:, -1]
            got = backend.decode(tokens[:, p:p + 1], torch.tensor([p]))[:, -1]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst <= 0.02, worst


def _nodes(lowered):
    """Call nodes of the serialized program's non-delegated ops (operator names)."""
    plan = lowered.executorch_program.execution_plan
    for p in plan:
        for op in p.operators:
            yield type("N", (), {"target": op.name})()


def test_balanced_pte_stores_the_shared_table_once(tiny, tmp_path):
    """``balanced``: the lookup reads the int8 head's codes; the program keeps its weights in
    ``<stem>.ptd`` where the table's bytes occur once (inside one ``.pte`` they occur twice:
    XNNPACK's copy and the lookup's). Logits match the eager model (measured max relative
    difference 2.4e-7 on the 2-layer model; bound 1e-3). Without its ``.ptd`` the program is
    refused with a message naming the file; a program without shared tables written to the same
    path removes the stale ``.ptd``."""
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
    from fxport.models.gemma4.export import export_methods
    from fxport.runtime.pte_backend import PteBackend, PteError, program_bytes

    model = tiny.model()
    quantize_for_xnnpack(model, "balanced")
    emb, head = model.model.embed_tokens, model.lm_head.weight
    assert emb.codes.data_ptr() == head.qdata.data_ptr()
    table = head.qdata.contiguous().numpy().tobytes()

    def programs():  # lowering consumes the programs: each lowering gets its own export
        with torch.no_grad():
            eps = export_methods(model, max_prefill_chunk=tiny.max_chunk)
        return apply_method_passes(eps, cpu_passes(windows=sliding_window_buffers(model)))[0]

    lowered = lower_fast(programs(), constant_methods=tiny.metadata())
    assert lowered.shared == ["prefill: b_model_embed_tokens_codes", "decode: b_model_embed_tokens_codes"]
    out = tmp_path / "b.pte"
    assert lowered.write(out) == [tmp_path / "b.ptd"]
    pte, ptd = out.read_bytes(), (tmp_path / "b.ptd").read_bytes()
    assert (pte.count(table), ptd.count(table)) == (0, 1)
    assert program_bytes(out) == len(pte) + len(ptd)
    inline = lower_fast(programs(), constant_methods=tiny.metadata(), weights_file=False)
    assert inline.buffer.count(table) == 2

    backend = PteBackend(out)
    tokens = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    model.reset_caches()
    worst = 0.0
    with torch.no_grad():
        want = model(tokens[:, :5], torch.arange(5))[:, -1]
        got = backend.prefill(tokens[:, :5], torch.arange(5))[:, -1]
        worst = float((got - want).abs().max() / want.abs().max())
        for p in range(5, 9):
            want = model(tokens[:, p:p + 1], torch.tensor([p]))[:, -1]
            got = backend.decode(tokens[:, p:p + 1], torch.tensor([p]))[:, -1]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst <= 1e-3, worst
    del backend

    from fxport.fileio import weights_file

    real = weights_file(out)  # out is published as a link: its weights are beside the link's target
    real.rename(tmp_path / "elsewhere.ptd")
    with pytest.raises(PteError, match=r"external_data_map is null\); its weights file b.ptd is missing: "
                                       r"copy it beside the .pte or re-export"):
        PteBackend(out)
    (tmp_path / "elsewhere.ptd").rename(real)
    assert inline.write(out) == [] and not (tmp_path / "b.ptd").exists()
    assert out.read_bytes() == inline.buffer
