"""Loaders on small files written here: GGUF files from ``gguf.GGUFWriter`` (a tiny Gemma 3),
safetensors directories from transformers' ``save_pretrained``. Parity references: the
original eager model (fp32 round trip), ``gguf.quants`` (quantized tensors), ``gguf.GGUFReader``
(the header parser), transformers (safetensors model, GGUF tokenizer). Error messages exact."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the [gguf] extra is part of every test setup

from fxport.models.gemma4.config import Gemma4Config, pattern_layer_types  # noqa: E402
from fxport.models.gemma4.load import (  # noqa: E402
    CheckpointError,
    CheckpointNotFoundError,
    build_model,
    iter_gguf_tensors,
    load_checkpoint,
    load_gguf,
    read_gguf,
    read_gguf_with_reader,
)
from fxport.models.gemma4.model import Gemma4ForCausalLM  # noqa: E402
from fxport.models.gemma4.tokenizer import load_tokenizer  # noqa: E402

from fxport.tests.models import tiny_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
WORDS = ["\u2581", "a", "b", "c", "h", "e", "l", "o", "\u2581h", "he", "ll", "lo", "hel", "hell",
         "hello", "\u2581hello", "\u2581a", "ab", "abc", "\u2581abc", "ello", "\u2581he"]
TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
          + [f"<0x{i:02X}>" for i in range(256)] + WORDS)
TYPES = [3, 3, 3, 2, 3, 3, 4, 4] + [6] * 256 + [1] * len(WORDS)


def tiny_config(**kw) -> Gemma4Config:
    """A Gemma 3 config exactly as the GGUF loader rebuilds it (float32-exact values)."""
    base = dict(
        family="gemma3", vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        rms_norm_eps=2.0**-20, norm_unit_offset=True, query_pre_attn_scalar=32, use_v_norm=False,
        use_layer_scalar=False, sliding_window=4, layer_types=pattern_layer_types(6, 6),
        rope_local_theta=10_000.0, rope_global_theta=1_000_000.0, rope_global_partial_factor=1.0,
        final_logit_softcapping=None, tie_word_embeddings=True, image_token_id=262_144,
        max_position_embeddings=128,
    )
    return Gemma4Config(**(base | kw))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = Gemma4ForCausalLM(tiny_config(), max_seq_len=16).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.5)  # norms differ from their init so the offset is tested
    return m


def write_gguf(path, model, **kw):
    """``tiny_gguf.write_gguf`` with this file's vocabulary (see tests/models/tiny_gguf.py)."""
    return tiny_gguf.write_gguf(path, model, tokens=TOKENS, token_types=TYPES, **kw)


@pytest.fixture(scope="module")
def f32_file(tiny, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny)


def test_fp32_round_trip_config_weights_and_logits(tiny, f32_file):
    ckpt = load_gguf(f32_file, progress=False)
    assert ckpt.config == tiny.config
    ref = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ckpt.state_dict) == sorted(ref)
    for name, t in ckpt.state_dict.items():
        # norms went through +1 / -1 in fp32: |w| < 3, so within 2 ulp(4) = 1e-6
        torch.testing.assert_close(t, ref[name], atol=1e-6 if "norm" in name else 0, rtol=0)
    model = build_model(ckpt, max_seq_len=16)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    tokens = torch.randint(0, len(TOKENS), (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny(tokens, torch.arange(9))
        tiny.reset_caches()
        got = model(tokens, torch.arange(9))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_quantized_types_dequantize_with_gguf(tiny, tmp_path):
    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q5_0,
             "blk.1.ffn_down.weight": Q.Q4_0, "blk.2.ffn_up.weight": Q.F16,
             "blk.3.attn_v.weight": Q.Q8_0}
    path = write_gguf(tmp_path / "q.gguf", tiny, types=types)
    ckpt = load_gguf(path, progress=False)
    sd = tiny.state_dict()
    raw = {t.name: t for t in iter_gguf_tensors(path)}
    hf_of = {tiny_gguf.gguf_name(k): k for k in sd if k != "lm_head.weight"}
    for name, qt in types.items():
        w = sd[hf_of[name]].float().numpy()
        assert raw[name].ggml_type == qt and raw[name].shape == w.shape
        if qt == Q.F16:
            want = w.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(w, qt)
            assert np.array_equal(raw[name].data, q)  # raw bytes, untouched
            want = gguf.quants.dequantize(q, qt)
        assert torch.equal(ckpt.state_dict[hf_of[name]], torch.from_numpy(want))
        # and close to the original (8-bit: 1/127 of the block max; 4-bit: 1/7)
        tol = {Q.Q8_0: 0.01, Q.Q5_0: 0.07, Q.Q4_0: 0.15, Q.F16: 1e-3}[qt] * float(np.abs(w).max())
        assert float(np.abs(want - w).max()) <= tol


def test_header_parser_equals_gguf_reader(tiny, tmp_path):
    path = write_gguf(tmp_path / "q.gguf", tiny, types={"token_embd.weight": Q.Q8_0})
    fast, ref = read_gguf(path), read_gguf_with_reader(path)
    assert fast.metadata == ref.metadata
    assert len(fast.tensors) == len(ref.tensors)
    for a, b in zip(fast.tensors, ref.tensors):
        assert (a.name, a.hf_name, a.ggml_type, a.shape) == (b.name, b.hf_name, b.ggml_type, b.shape)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)


def test_untied_output_weight(tiny, tmp_path):
    head = np.random.default_rng(0).standard_normal((len(TOKENS), 64)).astype(np.float32)
    path = write_gguf(tmp_path / "untied.gguf", tiny, extra=[("output.weight", head)])
    ckpt = load_gguf(path, progress=False)
    assert ckpt.config.tie_word_embeddings is False
    model = build_model(ckpt, max_seq_len=16)
    assert torch.equal(model.lm_head.weight, torch.from_numpy(head))
    assert model.lm_head.weight is not model.model.embed_tokens.weight


# ---- errors ----------------------------------------------------------------------------------
def _err(exc_type, fn, *args, **kw) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kw)
    return str(e.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    assert _err(CheckpointNotFoundError, load_gguf, p) == (
        f"GGUF file not found: {p}. Pass the path of a .gguf file (the Gemma 3 270M test file: "
        "fxport.models.gemma4.load.gemma3_270m_gguf())."
    )
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 zip, not gguf")
    assert _err(CheckpointError, load_gguf, p) == (
        f"{p} is not a GGUF file (starts with b'PK\\x03\\x04', expected b'GGUF'); pass a "
        "llama.cpp .gguf file."
    )


def test_truncated_file(f32_file, tmp_path):
    data = f32_file.read_bytes()
    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])  # cut inside the tensor data
    msg = _err(CheckpointError, load_gguf, half)
    assert msg.startswith(f"{half} ({len(data) // 2} bytes) is truncated: tensor ")
    assert msg.endswith(". Re-download or re-assemble the file.")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])  # cut inside the metadata
    msg = _err(CheckpointError, load_gguf, head)
    assert msg.startswith(f"{head} (300 bytes) is truncated: the header ends inside ")


def test_missing_tensor(tiny, tmp_path):
    p = write_gguf(tmp_path / "m.gguf", tiny, drop={"blk.1.ffn_up.weight"})
    assert _err(CheckpointError, load_gguf, p) == (
        f"{p}: 1 tensor(s) missing, first: model.layers.1.mlp.up_proj.weight (transformers name "
        "'model.layers.1.mlp.up_proj.weight'); the file is incomplete, re-export or re-download it."
    )


def test_shape_mismatch(tiny, tmp_path):
    p = write_gguf(tmp_path / "s.gguf", tiny, reshape={"blk.2.attn_q.weight": (32, 64)})
    assert _err(CheckpointError, load_gguf, p) == (
        f"{p}: tensor 'blk.2.attn_q.weight' (model.layers.2.self_attn.q_proj.weight) has shape "
        "(32, 64) but the config from the file's metadata needs (64, 64); the file is "
        "inconsistent, re-export it."
    )


def test_unknown_architecture(tiny, tmp_path):
    p = write_gguf(tmp_path / "llama.gguf", tiny, arch="llama")
    assert _err(CheckpointError, load_gguf, p) == (
        f"{p}: GGUF architecture 'llama' is not supported; fxport's GGUF loader supports gemma3. "
        "Convert a Gemma 3 model, or load a Hugging Face safetensors directory instead."
    )


def test_unexpected_tensor(tiny, tmp_path):
    p = write_gguf(tmp_path / "u.gguf", tiny, extra=[("rope_freqs.weight", np.ones(16, np.float32))])
    assert _err(CheckpointError, load_gguf, p) == (
        f"{p}: unexpected tensor 'rope_freqs.weight' (shape (16,)) for a 6-layer Gemma 3; the "
        "file does not match its own metadata or is not a Gemma 3 export."
    )


def test_build_model_rejects_mismatched_state_dict(f32_file):
    ckpt = load_gguf(f32_file, progress=False)
    bad = dict(ckpt.state_dict)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    msg = _err(CheckpointError, build_model, ckpt._replace(state_dict=bad), 16, source="x")
    assert msg == ("x: tensor 'model.layers.0.mlp.up_proj.weight' has shape (100, 64) but the "
                   "config needs (128, 64); the checkpoint does not match the config.")
    del bad["model.norm.weight"]
    msg = _err(CheckpointError, build_model, ckpt._replace(state_dict=bad), 16, source="x")
    assert msg == ("x: 1 tensor(s) missing for the model, first: 'model.norm.weight'; the "
                   "checkpoint does not match the config (wrong size or incomplete download).")


# ---- tokenizer from GGUF metadata vs transformers --------------------------------------------
def test_gguf_tokenizer_matches_transformers(f32_file):
    from transformers import AutoTokenizer

    ours = load_tokenizer(f32_file)
    ref = AutoTokenizer.from_pretrained(str(f32_file.parent), gguf_file=f32_file.name)
    for text in ["hello", " hello abc", "hello\nabc  a", "<start_of_turn>hello<end_of_turn>",
                 "xyz é", "abcabc hellohello", ""]:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text).input_ids), text
    assert ours.encode("hello", add_bos=False) == [TOKENS.index("hello")]
    assert ours.eos_ids == (1, 5)  # <eos>, <end_of_turn>


# ---- safetensors -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, sliding_window=4, layer_types=pattern_layer_types(3, 3),
                           max_position_embeddings=64, query_pre_attn_scalar=32)
    model = Gemma3ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d, max_shard_size="100KB")  # several shards + index
    return d, model


def test_safetensors_sharded_dir_matches_transformers(hf_dir):
    d, ref = hf_dir
    assert (d / "model.safetensors.index.json").exists()
    ckpt = load_checkpoint(d, progress=False)
    model = build_model(ckpt, max_seq_len=16)
    tokens = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = model(tokens, torch.arange(10))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_safetensors_missing_shard(hf_dir, tmp_path):
    import shutil

    d, _ = hf_dir
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert _err(CheckpointNotFoundError, load_checkpoint, copy) == (
        f"{copy / 'model.safetensors.index.json'} lists shards that are missing: {shard}; "
        "download every shard of the checkpoint."
    )
