"""Canonical packed format: nibble packing, layout validation, safetensors round trip, errors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.quant.packed import (
    FORMAT_VERSION,
    QuantFormatError,
    QuantizedWeight,
    load_quantized,
    pack_int4,
    save_quantized,
    unpack_int4,
)


@given(n=st.integers(1, 9), k2=st.integers(1, 20), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_pack_unpack_round_trip(n, k2, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, 2 * k2), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (n, k2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # byte layout: low nibble = even column, high nibble = odd column
    assert torch.equal(packed, (q[:, 0::2] + 16 * q[:, 1::2]).to(torch.uint8))


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(QuantFormatError, match=r"codes must lie in \[0, 15\], got \[-1, 3\]"):
        pack_int4(torch.tensor([[-1, 3]]))
    with pytest.raises(QuantFormatError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def _qw(n=4, k=64, g=32, bits=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes) if bits == 4 else codes
    scales = torch.rand(n, k // g, generator=gen) + 0.1
    zeros = torch.rand(n, k // g, generator=gen) * 2**bits
    return QuantizedWeight(packed, scales, zeros, g, bits, (n, k)), codes


def test_dequantize_formula():
    qw, codes = _qw()
    expect = (codes.float().reshape(4, 2, 32) - qw.zeros[..., None]) * qw.scales[..., None]
    assert torch.equal(qw.dequantize(), expect.reshape(4, 64))  # same fp32 ops: exact


def test_layout_validation_messages():
    qw, _ = _qw()
    with pytest.raises(QuantFormatError, match=r"packed must be uint8 of shape \(4, 32\)"):
        QuantizedWeight(qw.packed[:, :16], qw.scales, qw.zeros, 32, 4, (4, 64))
    with pytest.raises(QuantFormatError, match=r"scales must be floating of shape \(4, 2\)"):
        QuantizedWeight(qw.packed, qw.scales[:, :1], qw.zeros, 32, 4, (4, 64))
    with pytest.raises(QuantFormatError, match="group_size 24 must be positive, even and divide K = 64"):
        QuantizedWeight(qw.packed, qw.scales, qw.zeros, 24, 4, (4, 64))


def test_save_load_round_trip(tmp_path):
    q4, _ = _qw(bits=4)
    q8, _ = _qw(n=3, k=32, g=32, bits=8, seed=1)
    dense = {"model.norm.weight": torch.randn(7)}
    path = tmp_path / "w.safetensors"
    save_quantized(path, {"a.weight": q4, "b.weight": q8}, dense, {"recipe": "default"})
    weights, dense2, meta = load_quantized(path)
    assert meta["recipe"] == "default" and meta["format_version"] == str(FORMAT_VERSION)
    for name, ref in (("a.weight", q4), ("b.weight", q8)):
        got = weights[name]
        assert (got.bits, got.group_size, got.shape) == (ref.bits, ref.group_size, ref.shape)
        for part in ("packed", "scales", "zeros"):
            assert torch.equal(getattr(got, part), getattr(ref, part))
    assert torch.equal(dense2["model.norm.weight"], dense["model.norm.weight"])


def test_load_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    q4, _ = _qw()
    path = tmp_path / "w.safetensors"
    save_quantized(path, {"a.weight": q4})
    tensors = load_file(path)

    bad = tmp_path / "other.safetensors"
    save_file(tensors, bad, metadata={"format": "gguf"})
    with pytest.raises(QuantFormatError, match=r"format is 'gguf', expected 'fxport.quant.packed'"):
        load_quantized(bad)

    layout = json.dumps({"a.weight": {"bits": 4, "group_size": 32, "shape": [4, 64]}})
    save_file(tensors, bad, metadata={"format": "fxport.quant.packed", "format_version": "99", "layout": layout})
    with pytest.raises(QuantFormatError, match="format_version '99' is not supported"):
        load_quantized(bad)

    wrong = json.dumps({"a.weight": {"bits": 4, "group_size": 32, "shape": [4, 128]}})
    save_file(tensors, bad, metadata={"format": "fxport.quant.packed", "format_version": "1", "layout": wrong})
    with pytest.raises(QuantFormatError, match=r"other.safetensors: a.weight: packed must be uint8 of shape \(4, 64\)"):
        load_quantized(bad)

    del tensors["a.weight.zeros"]
    save_file(tensors, bad, metadata={"format": "fxport.quant.packed", "format_version": "1", "layout": layout})
    with pytest.raises(QuantFormatError, match=r"'a.weight' is missing tensors \['a.weight.zeros'\]"):
        load_quantized(bad)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:40])
    with pytest.raises(QuantFormatError, match="not a readable safetensors file"):
        load_quantized(corrupt)
