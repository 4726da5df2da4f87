"""export_methods: prefill (dynamic L) and decode (L = 1) programs in functional ATen IR.

Reference: the eager model on the same token sequence (fresh caches). The exported modules
(``ep.module()``) each own a copy of the buffers, so the test hands the caches from the
prefill module to the decode module by name, as a runtime sharing mutable buffers would.
Tolerance: max-abs logits diff <= 1e-5 (same fp32 ops, same order).
"""

from __future__ import annotations

import pytest
import torch

from fxport.models.gemma4.config import get_preset
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import Gemma4ForCausalLM, cache_buffers

ATOL = 1e-5


def _random_model(name: str, max_seq_len: int, seed: int = 0) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    m = Gemma4ForCausalLM(get_preset(name), max_seq_len=max_seq_len).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return m


def _hand_over_caches(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    dst_bufs = dict(dst.named_buffers())
    for name, buf in src.named_buffers():
        if name.endswith(("k_cache", "v_cache")):
            dst_bufs[name].copy_(buf)


def _check_program_structure(eps: dict, model: Gemma4ForCausalLM) -> None:
    pre, dec = eps["prefill"], eps["decode"]
    caches = cache_buffers(model)
    for ep in (pre, dec):
        nodes = [n for n in ep.graph.nodes
                 if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
        # functional IR: no in-place/mutating op; cache writes are aten.index_copy
        assert [n for n in nodes if n.target._schema.is_mutable] == []
        assert sum(n.target == torch.ops.aten.index_copy.default for n in nodes) == len(caches)
        assert sorted(ep.graph_signature.buffers_to_mutate.values()) == sorted(caches)
        sdpa = [n for n in nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
        assert len(sdpa) == model.config.num_hidden_layers
    assert pre.graph_signature.buffers == dec.graph_signature.buffers
    assert pre.graph_signature.parameters == dec.graph_signature.parameters
    tok = next(n for n in dec.graph.nodes if n.name == "tokens")
    assert tuple(tok.meta["val"].shape) == (1, 1)


def _run_sequence(prefill, decode, tokens, mm, chunk):
    """Prefill `chunk` tokens (with mm features) then decode the rest one by one."""
    outs = [prefill(tokens[:, :chunk], torch.arange(chunk), *mm)]
    for p in range(chunk, tokens.shape[1]):
        outs.append(decode(tokens[:, p:p + 1], torch.tensor([p])))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name,multimodal", [("tiny", True), ("tiny-gemma3", False), ("tiny-moe", False)])
def test_exported_methods_match_eager(name, multimodal):
    model = _random_model(name, max_seq_len=24)
    eps = export_methods(model, max_prefill_chunk=8, multimodal=multimodal)
    _check_program_structure(eps, model)

    cfg = model.config
    tokens = torch.randint(1, 200, (1, 10))
    mm: tuple = ()
    if multimodal:
        tokens[0, 2:5] = cfg.image_token_id
        mm = (torch.randn(3, cfg.hidden_size),)
    with torch.no_grad():
        model.reset_caches()
        ref = _run_sequence(model, model, tokens, mm, 6)
        prefill, decode = eps["prefill"].module(), eps["decode"].module()
        outs = [prefill(tokens[:, :6], torch.arange(6), *mm)]
        _hand_over_caches(prefill, decode)
        for p in range(6, 10):
            outs.append(decode(tokens[:, p:p + 1], torch.tensor([p])))
        got = torch.cat(outs, dim=1)
    assert (got - ref).abs().max().item() <= ATOL

    # L is dynamic: another prefill length on a fresh program copy
    with torch.no_grad():
        model.reset_caches()
        fresh = eps["prefill"].module()
        args = (tokens[:, :3], torch.arange(3)) + ((mm[0][:1],) if multimodal else ())
        if multimodal:
            args[0][0, 2] = cfg.image_token_id
        ref3 = model(*args)
        got3 = fresh(*args)
    assert (got3 - ref3).abs().max().item() <= ATOL


def test_export_on_meta_device():
    """Big presets export without weights (meta device); here 31b cut to 2 layers for time."""
    cfg = get_preset("31b")
    cfg = cfg.replace(num_hidden_layers=2, layer_types=cfg.layer_types[4:6])
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg, max_seq_len=4096)
    eps = export_methods(model, max_prefill_chunk=512)
    pre = eps["prefill"]
    tok = next(n for n in pre.graph.nodes if n.name == "tokens")
    L = tok.meta["val"].shape[1]
    assert isinstance(L, torch.SymInt)
    assert pre.range_constraints[L.node.expr].upper == 512
    sig = {s.target: s for s in pre.graph_signature.input_specs}
    assert set(cache_buffers(model)) <= set(sig)
    caches = dict(model.named_buffers())
    assert caches["model.layers.0.self_attn.k_cache"].shape == (1, 16, 4096, 256)  # sliding
    assert caches["model.layers.1.self_attn.k_cache"].shape == (1, 4, 4096, 512)  # full, k_eq_v


def test_export_rejects_bad_chunk_and_seq_len():
    model = Gemma4ForCausalLM(get_preset("tiny-gemma3"), max_seq_len=16)
    with pytest.raises(ValueError, match=r"max_prefill_chunk=17 must be in \[1, max_seq_len=16\]"):
        export_methods(model, max_prefill_chunk=17)
    with pytest.raises(ValueError, match="max_seq_len=32 differs from the model's cache length 16"):
        export_methods(model, max_prefill_chunk=8, max_seq_len=32)
