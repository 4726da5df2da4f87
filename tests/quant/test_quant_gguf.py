"""GGUF Q4_K / Q6_K / Q8_0 -> canonical form, checked against gguf.quants.dequantize on random
block bytes (every bit pattern of codes and packed scales), plus requantization reports."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from fxport.quant.gguf_import import import_tensor  # noqa: E402
from fxport.quant.packed import QuantFormatError  # noqa: E402
from fxport.quant.recipe import QuantConfig  # noqa: E402

BLOCK = {T.Q4_K: (256, 144), T.Q6_K: (256, 210), T.Q8_0: (32, 34)}


def _random_blocks(t, n, k, seed):
    rng = np.random.default_rng(seed)
    elems, nbytes = BLOCK[t]
    blocks = rng.integers(0, 256, size=(n * k // elems, nbytes), dtype=np.uint8)
    d = rng.uniform(0.001, 0.05, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    if t == T.Q4_K:
        blocks[:, 0:2] = d
        blocks[:, 2:4] = rng.uniform(0.001, 0.05, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
        blocks[0, 4] &= 0xC0  # first group of the first block: 6-bit scale 0 (constant -dmin*m group)
        blocks[0, 12] &= 0xF0
    elif t == T.Q6_K:
        blocks[:, -2:] = d
    else:
        blocks[:, 0:2] = d
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("t,mode,bits,group", [
    (T.Q8_0, "exact", 8, 32),
    (T.Q6_K, "exact", 8, 16),
    (T.Q4_K, "exact up to fp32 rounding", 4, 32),
])
def test_native_import_matches_gguf_dequantize(t, mode, bits, group):
    n, k = 3, 512
    data = _random_blocks(t, n, k, seed=int(t))
    qw, rep = import_tensor("w", t, (n, k), data)
    ref = torch.from_numpy(dequantize(data, t).reshape(n, k))
    assert (qw.bits, qw.group_size, qw.shape) == (bits, group, (n, k))
    assert rep.mode == mode
    got = qw.dequantize(torch.float32)
    if mode == "exact":
        assert torch.equal(got, ref) and rep.max_abs_err == 0.0
    else:  # (q - dmin*m/(d*sc)) * d*sc vs d*sc*q - dmin*m: a few fp32 ulps of the group range
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert rep.max_abs_err == float((got - ref).abs().max())


def test_q4_k_zero_scale_group_is_exact_constant():
    data = _random_blocks(T.Q4_K, 1, 256, seed=7)
    qw, _ = import_tensor("w", T.Q4_K, (1, 256), data)
    ref = dequantize(data, T.Q4_K).reshape(1, 256)
    assert np.all(ref[0, :32] == ref[0, 0])  # the gguf definition: d*0*q - dmin*m
    assert torch.equal(qw.dequantize(torch.float32)[0, :32], torch.from_numpy(ref[0, :32]))


def test_requantize_reports_error():
    data = _random_blocks(T.Q6_K, 4, 256, seed=3)
    qw, rep = import_tensor("blk.0.ffn_down.weight", T.Q6_K, (4, 256), data, QuantConfig(4, 32))
    ref = torch.from_numpy(dequantize(data, T.Q6_K).reshape(4, 256))
    err = (qw.dequantize() - ref).abs()
    assert (qw.bits, qw.group_size) == (4, 32)
    assert rep.mode == "requantized to int4 g32 minmax"
    assert rep.max_abs_err == pytest.approx(float(err.max())) and rep.mean_abs_err == pytest.approx(float(err.mean()))
    assert 0 < rep.max_abs_err <= float(qw.scales.max()) / 2 + 1e-6  # min-max rounding bound


def test_unsupported_type_message():
    with pytest.raises(QuantFormatError, match=r"w: GGUF type Q5_K has no native canonical form .* pass a QuantConfig"):
        import_tensor("w", T.Q5_K, (1, 256), np.zeros((1, 176), np.uint8))


@pytest.mark.slow
def test_real_gemma3_270m_tensors():
    """Real Q4_K_M file: one tensor of each native type converts (exactly / up to fp32 rounding);
    a Q5_0 tensor selected by a recipe is requantized with its error reported."""
    from fxport.models.gemma4.load import gemma3_270m_gguf, iter_gguf_tensors
    from fxport.quant.gguf_import import import_gguf
    from fxport.quant.recipe import DEFAULT_RECIPE

    path = gemma3_270m_gguf()
    names = {
        "model.layers.0.self_attn.o_proj.weight": ("Q4_K", "exact up to fp32 rounding"),
        "model.layers.0.self_attn.v_proj.weight": ("Q8_0", "exact"),
        "model.layers.0.mlp.down_proj.weight": ("Q6_K", "exact"),
    }
    weights, reports = import_gguf(path, names=list(names))
    raw = {t.hf_name: t for t in iter_gguf_tensors(path) if t.hf_name in names or t.hf_name == "model.layers.0.mlp.up_proj.weight"}
    assert {r.name: (r.ggml_type, r.mode) for r in reports} == names
    for name, qw in weights.items():
        ref = torch.from_numpy(raw[name].dequantize())  # load.py's path: gguf.quants.dequantize
        torch.testing.assert_close(qw.dequantize(torch.float32), ref, rtol=0, atol=1e-7)

    up = "model.layers.0.mlp.up_proj.weight"
    assert raw[up].ggml_type.name == "Q5_0"
    weights, reports = import_gguf(path, recipe=DEFAULT_RECIPE, names=[up])
    (rep,) = reports
    assert (rep.ggml_type, rep.mode, weights[up].bits, weights[up].group_size) == ("Q5_0", "requantized to int4 g32 minmax", 4, 32)
    err = (weights[up].dequantize() - torch.from_numpy(raw[up].dequantize())).abs()
    assert rep.max_abs_err == pytest.approx(float(err.max())) and rep.max_abs_err > 0
