"""Packed-int4 files: metadata that is valid JSON of the wrong shape is a QuantFormatError, and a
save that fails half way keeps the previous file."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from fxport.quant.packed import QuantFormatError, QuantizedWeight, load_quantized, pack_int4, save_quantized


def _qw() -> QuantizedWeight:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 64), generator=gen, dtype=torch.uint8)
    return QuantizedWeight(pack_int4(codes), torch.rand(4, 2, generator=gen) + 0.1,
                           torch.rand(4, 2, generator=gen) * 16, 32, 4, (4, 64))


@pytest.fixture
def tensors(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    save_quantized(path, {"a.weight": _qw()})
    return load_file(path)


@pytest.mark.parametrize("layout,message", [
    ("[1, 2]", "corrupt layout metadata (a JSON list, expected an object of weight name -> "
               "{bits, group_size, shape}); re-write it with fxport.quant.save_quantized"),
    ("\"a.weight\"", "corrupt layout metadata (a JSON str, expected an object of weight name -> "),
    ("null", "corrupt layout metadata (a JSON NoneType, expected an object"),
    ('{"a.weight": [4, 32]}', "corrupt layout entry for 'a.weight': [4, 32]"),
])
def test_layout_not_an_object(tmp_path, tensors, layout, message):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={"format": "fxport.quant.packed", "format_version": "1", "layout": layout})
    with pytest.raises(QuantFormatError) as info:
        load_quantized(bad)
    assert str(info.value).startswith(f"{bad}: {message}")


def test_dense_not_a_list(tmp_path, tensors):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    layout = json.dumps({"a.weight": {"bits": 4, "group_size": 32, "shape": [4, 64]}})
    save_file(tensors, bad, metadata={"format": "fxport.quant.packed", "format_version": "1", "layout": layout,
                                      "dense": '{"x": 1}'})
    with pytest.raises(QuantFormatError) as info:
        load_quantized(bad)
    assert str(info.value) == (f"{bad}: corrupt dense metadata ('{{\"x\": 1}}', expected a JSON list of tensor "
                               "names); re-write it with fxport.quant.save_quantized")


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["enospc", "kill"])
def test_failed_save_keeps_previous_file(tmp_path, monkeypatch, exc):
    import safetensors.torch

    path = tmp_path / "w.safetensors"
    save_quantized(path, {"a.weight": _qw()})
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a fragment of the new file, then the failure
            f.truncate(os.path.getsize(filename) // 2)
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(type(exc)):
        save_quantized(path, {"b.weight": _qw()})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
