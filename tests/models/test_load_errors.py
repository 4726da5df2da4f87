"""Bad checkpoints are refused at load, naming the tensor or key and the file: NaN/Inf weights
(GGUF, safetensors), NaN/Inf float metadata; GGUF is recognized by its magic bytes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")  # the [gguf] extra is part of every test setup

from fxport.models.gemma4.load import CheckpointError, is_gguf_file, load_checkpoint, load_model  # noqa: E402

from fxport.tests.models import tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_gguf.tiny_model()


def _err(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kw)
    return str(info.value)


@pytest.mark.parametrize("value,counts", [(math.nan, "1 NaN and 0 Inf"), (math.inf, "0 NaN and 1 Inf"),
                                          (-math.inf, "0 NaN and 1 Inf")])
def test_gguf_non_finite_tensor_names_tensor_and_file(model, tmp_path, value, counts):
    path = tiny_gguf.write_tiny_gguf(tmp_path / "bad.gguf", model, poison=("blk.1.ffn_down.weight", value))
    assert _err(load_checkpoint, path, progress=False) == (
        f"{path}: tensor 'blk.1.ffn_down.weight' has {counts} value(s) of 512; the weights are corrupt "
        "(a broken conversion or download): re-download or re-convert the checkpoint.")


def test_gguf_nan_norm_weight(model, tmp_path):
    path = tiny_gguf.write_tiny_gguf(tmp_path / "bad.gguf", model, poison=("output_norm.weight", math.nan))
    assert _err(load_model, path, 16, progress=False).startswith(
        f"{path}: tensor 'output_norm.weight' has 1 NaN and 0 Inf value(s) of 16;")


@pytest.mark.parametrize("key,value", [("gemma3.attention.layer_norm_rms_epsilon", math.nan),
                                       ("gemma3.rope.freq_base", math.inf),
                                       ("general.some_float", -math.inf)])
def test_gguf_non_finite_metadata(model, tmp_path, key, value):
    path = tiny_gguf.write_tiny_gguf(tmp_path / "bad.gguf", model, floats={key: value})
    assert _err(load_checkpoint, path, progress=False) == (
        f"{path}: GGUF metadata {key!r} is {value}; a model needs a finite value here. The file is "
        "corrupt or was written by a broken converter: re-download or re-convert it.")


def test_gguf_recognized_by_magic_not_suffix(model, tmp_path):
    """An Ollama blob (sha256-... without a suffix) loads as GGUF, with its tokenizer."""
    from fxport.models.gemma4.tokenizer import load_tokenizer

    named = tiny_gguf.write_tiny_gguf(tmp_path / "tiny.gguf", model)
    blob = tmp_path / "sha256-0123abcd"
    shutil.copyfile(named, blob)
    assert is_gguf_file(blob) and not is_gguf_file(tmp_path)
    got, tok_source = load_model(blob, 16, progress=False)
    want, _ = load_model(named, 16, progress=False)
    for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), n
    assert load_tokenizer(blob).encode("ab") == load_tokenizer(named).encode("ab") == [2, 262]
    assert load_tokenizer(tok_source).vocab_size == len(tiny_gguf.TOKENS)


def test_gguf_suffix_without_magic_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    assert _err(load_checkpoint, fake) == (
        f"{fake} is not a GGUF file (starts with b'PK\\x03\\x04', expected b'GGUF'); pass a llama.cpp .gguf file.")


# ---- safetensors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fxport.models.gemma4.config import pattern_layer_types

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                           layer_types=pattern_layer_types(2, 2), max_position_embeddings=32,
                           query_pre_attn_scalar=8)
    model = Gemma3ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


def _poisoned_copy(src: Path, dst: Path, name: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    t = tensors[name].clone()
    t.view(-1)[3] = value
    tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_hf_dir_loads(hf_dir):
    config, sd, _ = load_checkpoint(hf_dir, progress=False)
    assert config.vocab_size == 64 and all(torch.isfinite(t).all() for t in sd.values())


@pytest.mark.parametrize("value,counts", [(math.nan, "1 NaN and 0 Inf"), (math.inf, "0 NaN and 1 Inf")])
def test_safetensors_non_finite_tensor(hf_dir, tmp_path, value, counts):
    name = "model.layers.0.self_attn.q_proj.weight"
    d = _poisoned_copy(hf_dir, tmp_path / "bad", name, value)
    assert _err(load_checkpoint, d, progress=False) == (
        f"{d / 'model.safetensors'}: tensor {name!r} has {counts} value(s) of 256; the weights are corrupt "
        "(a broken conversion or download): re-download or re-convert the checkpoint.")


def test_hf_config_nan_rms_norm_eps(hf_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = math.nan
    (d / "config.json").write_text(json.dumps(cfg))  # Python's json writes NaN
    assert _err(load_checkpoint, d, progress=False) == (
        f"{d / 'config.json'}: config rms_norm_eps is nan; it must be a finite number. Fix the value in "
        "the checkpoint's config (or re-download it).")


def test_huge_finite_weights_are_not_mistaken_for_inf():
    """The check sums each tensor first; a sum that overflows falls back to the exact test."""
    from fxport.models.gemma4.load import _check_finite_tensor

    big = torch.full((4,), 3e38)
    assert torch.isinf(big.sum())
    _check_finite_tensor(big, "w", "f")  # no error
    _check_finite_tensor(torch.zeros(0), "empty", "f")
    _check_finite_tensor(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "bf16", "f")
    with pytest.raises(CheckpointError, match=r"^f: tensor 'h' has 1 NaN and 1 Inf value\(s\) of 3;"):
        _check_finite_tensor(torch.tensor([1.0, math.nan, -math.inf], dtype=torch.float16), "h", "f")
