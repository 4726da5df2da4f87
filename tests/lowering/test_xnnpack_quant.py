"""XNNPACK recipes: exact selection (which linear gets what), the report of a mixed recipe, and
a tiny ``balanced`` .pte checked against the eager torchao emulation.

The int4 g32 linears lower as ``8da4w``'s do: an HQQ-grid weight is the same
``IntxUnpackedToInt8Tensor`` form (symmetric, zero point 0; asserted below), GPTQ rewrites its
codes in place (tests/quant/test_gptq.py), and the 8da4w program is checked against the
quantized eager model in tests/cli/test_cli.py (``fxport export --quant 8da4w`` then ``fxport run``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxport.lowering.xnnpack_quant import (
    DEFAULT_RECIPE,
    INT4_G32,
    INT4_G32_HQQ,
    INT8_PC,
    XNNPACK_RECIPES,
    XnnpackRecipe,
    quantize_for_xnnpack,
    recipe_names,
)
from fxport.models.gemma4.model import sliding_window_buffers
from fxport.tests.lowering.helpers import lower_fast
from fxport.quant.embedding import QuantizedEmbedding

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# int4 g32 HQQ for the MLP and q/k/o, int8 v_proj and head, the lookup from the head's codes
MIXED = XnnpackRecipe(
    "mixed",
    ((r"lm_head\.weight", INT8_PC), (r".*self_attn\.v_proj\.weight", INT8_PC), (r".*", INT4_G32_HQQ)),
    lookup_from_head=True,
)
VALID = "8da4w, 8da4w-head8, 8da8w, balanced, compact, default, sensitive"


def test_recipe_names():
    assert recipe_names() == VALID.split(", ")
    assert DEFAULT_RECIPE.name == "balanced"


def test_the_dropped_fast_recipe_is_an_unknown_name():
    """``fast`` was dropped on 2026-12-05 (module docstring): its name is refused like any other."""
    with pytest.raises(ValueError) as e:
        quantize_for_xnnpack(nn.Sequential(nn.Linear(32, 32)), "fast")
    assert str(e.value) == f"unknown quantization recipe 'fast'; choose one of: {VALID}"


def test_recipe_rules():
    """Which weight gets what, rule by rule."""
    for i in range(18):
        for lin in LINEARS:
            got = MIXED.pick(f"model.layers.{i}.{lin}.weight")
            assert got == (INT8_PC if lin == "self_attn.v_proj" else INT4_G32_HQQ), (i, lin, got)
    assert MIXED.pick("lm_head.weight") == INT8_PC
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
    report = quantize_for_xnnpack(model, MIXED)
    want = {"lm_head": "8da8w per-channel"}
    for i in range(3):
        for lin in LINEARS:
            want[f"model.layers.{i}.{lin}"] = "8da8w per-channel" if lin == "self_attn.v_proj" else "8da4w g32 hqq"
    assert report.quantized == want
    assert report.kept_float == {}
    w = model.model.layers[0].mlp.up_proj.weight  # the form XNNPACK's qb4w lowers, as 8da4w's
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and w.block_size == (1, 32)
    assert (w.qdata.dtype, w.scale.dtype) == (torch.int8, torch.float32) and not w.zero_point.any()
    assert -8 <= int(w.qdata.min()) and int(w.qdata.max()) <= 7
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
