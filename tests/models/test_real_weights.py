"""Real Gemma 3 270M Q4_K_M GGUF: fxport's loader + eager model + tokenizer + generate against
transformers loading the same file (its own GGUF path: legacy loader, dense fp32 weights).

Budget: about a minute (transformers' GGUF load dominates). Tolerances: weights must be
bit-identical (both dequantize with the gguf package and subtract 1 from norms in fp32); greedy
tokens must be identical; prompt logits within 1e-3 absolute (logits ~ 30, fp32, different
kernels / summation order).
"""

import gc

import pytest
import torch

from fxport.models.gemma4.load import build_model, gemma3_270m_gguf, load_gguf
from fxport.models.gemma4.tokenizer import load_tokenizer
from fxport.runtime.generate import generate

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_path():
    return gemma3_270m_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    ckpt = load_gguf(gguf_path, progress=False)
    model = build_model(ckpt, max_seq_len=64, source=str(gguf_path))
    return ckpt, model, load_tokenizer(ckpt.tokenizer)


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    yield model, tok
    del model
    gc.collect()


def test_config_from_metadata(ours):
    cfg = ours[0].config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (262144, 640, 2048, 18)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.tie_word_embeddings) == (512, 256, True)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (cfg.rope_local_theta, cfg.rope_global_theta) == (10_000.0, 1_000_000.0)


def test_state_dict_equals_transformers(ours, hf):
    """Every tensor (names, PyTorch shapes, dequantized values, norm offsets) bit-identical to
    what transformers' GGUF loader puts in its Gemma3ForCausalLM."""
    sd = ours[0].state_dict
    ref = hf[0].state_dict()
    ref.pop("lm_head.weight")  # tied to model.embed_tokens.weight
    assert sorted(sd) == sorted(ref)
    bad = [n for n in sd if not torch.equal(sd[n], ref[n])]
    assert not bad, bad[:5]


def test_tokenizer_matches_transformers(ours, hf):
    tok, ref = ours[2], hf[1]
    texts = [
        PROMPT,
        "Hello,  world!\n\nNew   paragraph\twith tabs",
        "héllo wörld ✓ 😀 日本語のテキスト",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        " leading space and trailing   ",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    for t in texts:
        ids = tok.encode(t)
        assert ids == ref(t).input_ids, t
        assert tok.decode(ids) == ref.decode(ids), t
    assert (tok.bos_id, tok.eos_ids[0], tok.vocab_size) == (2, 1, 262144)


def test_greedy_20_tokens_equal_transformers(ours, hf):
    _, model, tok = ours
    hf_model, hf_tok = hf
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf_model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        ref_logits = hf_model(ids).logits[0]  # (L, V)
    res = generate(model, tok, PROMPT, 20, max_prefill_chunk=4)
    assert res.prompt_tokens == ids[0].tolist()
    assert res.tokens == ref, (res.tokens, ref)
    assert res.text.startswith(" the capital of")
    model.reset_caches()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]))[0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
