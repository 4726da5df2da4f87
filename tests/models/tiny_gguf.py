"""The tests' GGUF writer (``from fxport.tests.models import tiny_gguf``; not collected).

``write_gguf`` writes any tiny Gemma 3 model in llama.cpp's layout (norms stored as ``1 + w``);
test_load.py uses it with its own vocabulary. ``write_tiny_gguf`` writes a 2-layer model with a
40-token byte-level vocabulary; ``poison`` puts NaN/Inf into one tensor and ``floats`` overrides
float metadata (e.g. a NaN ``rms_norm_eps``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# Byte tokens 4..259, then words: "ab" encodes as [bos, 262], an id a 256-token program lacks.
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + ["a", "b", "ab", "\u2581a"]
TYPES = [3, 3, 3, 2] + [6] * 256 + [1] * 4


def tiny_model(vocab_size: int = len(TOKENS)):
    from fxport.models.gemma4.config import Gemma4Config, pattern_layer_types
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    config = Gemma4Config(
        family="gemma3", vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        rms_norm_eps=2.0**-20, norm_unit_offset=True, query_pre_attn_scalar=8, use_v_norm=False,
        use_layer_scalar=False, sliding_window=4, layer_types=pattern_layer_types(2, 6),
        rope_local_theta=10_000.0, rope_global_theta=1_000_000.0, rope_global_partial_factor=1.0,
        final_logit_softcapping=None, tie_word_embeddings=True, image_token_id=262_144,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Gemma4ForCausalLM(config, max_seq_len=16).eval()


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(path, model, *, tokens=TOKENS, token_types=TYPES, types=None, drop=(), reshape=None,
               arch="gemma3", extra=(), poison: tuple[str, float] | None = None,
               floats: dict[str, float] | None = None) -> Path:
    """A llama.cpp-style Gemma 3 GGUF of ``model``: norms stored as 1 + w, shapes reversed by the
    writer, tensor types per GGUF name (default F32). ``drop`` leaves tensors out, ``reshape``
    replaces one by zeros of another shape, ``extra`` adds ``(name, array)`` tensors, ``poison``
    puts one NaN/Inf value into a tensor, ``floats`` overrides float metadata."""
    import gguf

    Q = gguf.GGMLQuantizationType
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    p = f"{arch}."
    for key, value in (("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim), ("attention.sliding_window", cfg.sliding_window)):
        w.add_uint32(p + key, value)
    float_md = {p + "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, p + "rope.freq_base": cfg.rope_global_theta}
    float_md.update(floats or {})
    for key, value in float_md.items():
        w.add_float32(key, value)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(token_types)
    w.add_uint32("tokenizer.ggml.bos_token_id", 2)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    types = types or {}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        if name in drop:
            continue
        a = t.detach().float().numpy().copy()
        if hf.endswith("norm.weight"):
            a = a + 1.0
        if reshape and name in reshape:
            a = np.zeros(reshape[name], dtype=np.float32)
        if poison is not None and poison[0] == name:
            a.reshape(-1)[a.size // 2] = poison[1]
        qt = types.get(name, Q.F32)
        if qt == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        elif qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    for name, a in extra:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_tiny_gguf(path: Path, model=None, poison: tuple[str, float] | None = None,
                    floats: dict[str, float] | None = None) -> Path:
    """:func:`write_gguf` of :func:`tiny_model` (or ``model``)."""
    return write_gguf(path, model if model is not None else tiny_model(), poison=poison, floats=floats)
