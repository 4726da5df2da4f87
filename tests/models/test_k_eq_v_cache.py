"""k_eq_v global layers with one cache (``derive_keys_from_values``): same logits, less memory.

Gemma 4's k_eq_v layers compute K = rope(k_norm(raw)) and V = v_norm(raw) from one projection,
so the K cache is a function of the V cache. The single-cache model must give the logits of
the two-cache model: bit for bit in fp32 (V * k_norm scale equals k_norm(raw) exactly, RoPE of
every slot's position equals the RoPE applied at write time), within bf16 rounding in bf16;
eager and exported (prefill chunks + decode steps sharing the caches).
"""

import dataclasses

import pytest
import torch

from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import Gemma4ForCausalLM, cache_buffers, derive_keys_from_values


def _pair(preset="tiny", dtype=torch.float32, **changes):
    cfg = dataclasses.replace(get_preset(preset), **changes) if changes else get_preset(preset)
    torch.manual_seed(0)
    ref = Gemma4ForCausalLM(cfg, max_seq_len=48).to(dtype).eval()
    one = Gemma4ForCausalLM(cfg, max_seq_len=48).to(dtype).eval()
    one.load_state_dict(ref.state_dict())
    return cfg, ref, one


def _run(model, chunks):
    out, pos = [], 0
    with torch.no_grad():
        for toks in chunks:
            out.append(model(toks, torch.arange(pos, pos + toks.shape[1])))
            pos += toks.shape[1]
    return torch.cat(out, dim=1)


def _chunks(seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 250, (1, 20), generator=g)
    return [toks[:, :7], toks[:, 7:15], *(toks[:, i:i + 1] for i in range(15, 20))]  # prefill x2, decode x5


def test_only_k_eq_v_layers_drop_their_k_cache():
    cfg, ref, one = _pair()
    changed = derive_keys_from_values(one)
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention" and cfg.kv_source(i) is None]
    assert changed == [f"model.layers.{i}.self_attn" for i in full] and full
    dropped = set(cache_buffers(ref)) - set(cache_buffers(one))
    assert dropped == {f"model.layers.{i}.self_attn.k_cache" for i in full}
    assert derive_keys_from_values(one) == []  # idempotent


@pytest.mark.parametrize("use_v_norm", [True, False])
def test_single_cache_logits_equal_fp32(use_v_norm):
    cfg, ref, one = _pair(use_v_norm=use_v_norm)
    derive_keys_from_values(one)
    chunks = _chunks()
    a, b = _run(ref, chunks), _run(one, chunks)
    # v_norm: bit for bit; without v_norm, k_norm(V) is the same op on the same tensor
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_single_cache_bf16_within_rounding():
    """bf16: K is rounded twice (V, then V * scale) instead of once. The single-cache model must
    stay as close to the fp32 logits as the bf16 two-cache model is (its own rounding error)."""
    _, ref32, _ = _pair()
    _, ref, one = _pair(dtype=torch.bfloat16)
    derive_keys_from_values(one)
    chunks = _chunks(1)
    exact = _run(ref32, chunks)
    err_ref = (_run(ref, chunks).float() - exact).abs()
    err_one = (_run(one, chunks).float() - exact).abs()
    assert err_one.mean() <= 1.25 * err_ref.mean(), (err_one.mean(), err_ref.mean())
    assert err_one.max() <= 2.0 * err_ref.max(), (err_one.max(), err_ref.max())


def test_exported_single_cache_matches_eager():
    _, ref, one = _pair()
    derive_keys_from_values(one)
    progs = export_methods(one, max_prefill_chunk=8)
    names = {s.target for s in progs["decode"].graph_signature.input_specs if s.target and "cache" in s.target}
    assert names and not {"model.layers.2.self_attn.k_cache", "model.layers.5.self_attn.k_cache"} & names
    chunks = _chunks(2)
    want = _run(ref, chunks)
    pre, dec = progs["prefill"].module(), progs["decode"].module()
    # the two methods share cache buffers: carry them from one module to the other
    state = {n: b.clone() for n, b in pre.named_buffers() if n.endswith("_cache")}
    got, pos = [], 0
    with torch.no_grad():
        for toks in chunks:
            mod = pre if toks.shape[1] > 1 else dec
            for n, b in mod.named_buffers():
                if n in state:
                    b.copy_(state[n])
            got.append(mod(toks, torch.arange(pos, pos + toks.shape[1])))
            state = {n: b.clone() for n, b in mod.named_buffers() if n.endswith("_cache")}
            pos += toks.shape[1]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)
