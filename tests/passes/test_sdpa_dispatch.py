"""SDPADispatch: per-site kernel choice, repeat_kv peeling, parity on CPU, idempotence.

The toy model follows the eager-model contract (cache buffers written with index_copy_,
repeat_kv unsqueeze -> expand -> reshape, SDPA with a bool (1, 1, L, S) mask built from
input_pos) with one long "global" cache and one short "sliding" cache (as after
RingBufferKVCache); the real Gemma 4 programs are covered at the end of the file.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fxport.kernels.ops  # noqa: F401
from fxport.passes import graph as G
from fxport.passes.base import PassContext
from fxport.passes.sdpa_dispatch import SDPADispatch
from fxport.tests.steps import run_steps

aten = torch.ops.aten
SPLITK = torch.ops.fxport.sdpa_decode_splitk.default
TILED = torch.ops.fxport.sdpa.default


def repeat_kv(x, n_rep):  # (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D)
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class ToyAttention(torch.nn.Module):
    """Layer 0 global (cache S_g), layer 1 sliding (window W, cache S_l <= S_g)."""

    def __init__(self, s_global=48, s_local=16, window=6, h_q=4, h_kv=2, d=8):
        super().__init__()
        self.h_q, self.h_kv, self.window, self.s_local = h_q, h_kv, window, s_local
        for i, s in enumerate((s_global, s_local)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, h_kv, s, d))
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, h_kv, s, d))
        self.proj = torch.nn.Linear(d, d)

    def forward(self, q, k, v, input_pos):  # q (1, H_q, L, D), k/v (1, H_kv, L, D), input_pos (L,)
        out = q
        for i in range(2):
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            kc.index_copy_(2, input_pos, k)
            vc.index_copy_(2, input_pos, v)
            S = kc.shape[2]
            k_pos = torch.arange(S)
            mask = k_pos[None, :] <= input_pos[:, None]  # (L, S)
            if i == 1:
                mask = mask & (input_pos[:, None] - k_pos[None, :] < self.window)
            mask = mask[None, None]  # (1, 1, L, S)
            n_rep = self.h_q // self.h_kv
            out = F.scaled_dot_product_attention(
                self.proj(out), repeat_kv(kc, n_rep), repeat_kv(vc, n_rep), attn_mask=mask, scale=0.7
            )
        return out


@functools.lru_cache(maxsize=None)
def _export(L, dynamic):
    """Exported once per (L, dynamic); passes never mutate their input program."""
    m = ToyAttention()
    torch.manual_seed(0)
    args = (torch.randn(1, m.h_q, L, 8), torch.randn(1, m.h_kv, L, 8), torch.randn(1, m.h_kv, L, 8), torch.arange(L))
    shapes = None
    if dynamic:
        d = torch.export.Dim("L", min=2, max=8)
        shapes = ({2: d}, {2: d}, {2: d}, {0: d})
    return G.to_functional(torch.export.export(m, args, dynamic_shapes=shapes))


def _targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _inputs(L, start, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g),
            torch.randn(1, 2, L, 8, generator=g), torch.arange(start, start + L))


def test_decode_chooses_splitk_only_above_threshold():
    ep = _export(1, dynamic=False)
    res = SDPADispatch(threshold=32)(ep, PassContext(method="decode"))
    assert res.changed and res.stats.matched == 2 and res.stats.rewritten == 2
    choices = [(s["kv_buffer"], s["choice"]) for s in res.stats.sites]
    assert choices == [("k_cache_0", "sdpa_decode_splitk"), ("k_cache_1", "sdpa")]
    assert res.stats.sites[0]["reason"] == "L_q=1, L_kv=48 > threshold 32"
    assert res.stats.sites[1]["reason"] == "L_q=1, L_kv=16 <= threshold 32"
    targets = _targets(res.ep)
    assert targets.count(SPLITK) == 1 and targets.count(TILED) == 1
    assert aten.scaled_dot_product_attention.default not in targets
    # repeat_kv peeled: no expand left, the ops read the caches (B, H_kv, S, D) directly
    assert aten.expand.default not in targets
    splitk = next(n for n in res.ep.graph.nodes if n.target == SPLITK)
    assert tuple(splitk.args[1].meta["val"].shape) == (1, 2, 48, 8)
    assert splitk.args[5] == 0.7


def test_threshold_is_strict_and_configurable():
    ep = _export(1, dynamic=False)
    sites = SDPADispatch(threshold=48)(ep).stats.sites
    assert [s["choice"] for s in sites] == ["sdpa", "sdpa"]
    sites = SDPADispatch(threshold=15)(ep).stats.sites
    assert [s["choice"] for s in sites] == ["sdpa_decode_splitk", "sdpa_decode_splitk"]


def test_fallback_aten_leaves_other_sites():
    ep = _export(1, dynamic=False)
    res = SDPADispatch(threshold=32, fallback="aten")(ep)
    assert [s["choice"] for s in res.stats.sites] == ["sdpa_decode_splitk", "aten"]
    targets = _targets(res.ep)
    assert targets.count(SPLITK) == 1 and targets.count(aten.scaled_dot_product_attention.default) == 1
    again = SDPADispatch(threshold=32, fallback="aten")(res.ep)
    assert not again.changed and again.stats.rewritten == 0


@pytest.mark.parametrize("use_valid_len", [True, False])
def test_decode_and_prefill_match_original_on_cpu(use_valid_len):
    prefill, decode = _export(5, dynamic=True), _export(1, dynamic=False)
    p = SDPADispatch(threshold=32, valid_len=use_valid_len)(prefill, PassContext(method="prefill"))
    d = SDPADispatch(threshold=32, valid_len=use_valid_len)(decode, PassContext(method="decode"))
    assert [s["choice"] for s in p.stats.sites] == ["sdpa", "sdpa"]
    assert "L_q=s" in p.stats.sites[0]["reason"] or "prefill" in p.stats.sites[0]["reason"]
    assert _targets(p.ep).count(TILED) == 2
    has_amax = aten.amax.default in _targets(d.ep)
    assert has_amax == use_valid_len
    ref_p, ref_d, new_p, new_d = prefill.module(), decode.module(), p.ep.module(), d.ep.module()
    ref = [ref_p(*_inputs(5, 0, 0))]
    new = [new_p(*_inputs(5, 0, 0))]
    for name in ("k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"):
        getattr(ref_d, name).copy_(getattr(ref_p, name))
        getattr(new_d, name).copy_(getattr(new_p, name))
    for t in range(5, 12):
        ref.append(ref_d(*_inputs(1, t, t)))
        new.append(new_d(*_inputs(1, t, t)))
    for r, n in zip(ref, new):
        torch.testing.assert_close(n, r, rtol=0, atol=0)  # CPU reference = aten on same values


def test_idempotent():
    ep = _export(1, dynamic=False)
    once = SDPADispatch(threshold=32)(ep)
    twice = SDPADispatch(threshold=32)(once.ep)
    assert not twice.changed and twice.stats.matched == 0
    assert str(twice.ep.graph) == str(once.ep.graph)


def test_valid_len_shared_per_mask_and_equals_filled_length():
    ep = _export(1, dynamic=False)
    res = SDPADispatch(threshold=32)(ep)
    amaxes = [n for n in res.ep.graph.nodes if n.target == aten.amax.default]
    assert len(amaxes) == 2  # one per distinct mask (global and sliding)
    splitk = next(n for n in res.ep.graph.nodes if n.target == SPLITK)
    assert splitk.args[4].target == aten.amax.default
    assert splitk.args[4].args[1] == [1, 2, 3]  # reduced over heads, queries, keys: (B,)
    # at position 9 the global mask attends keys 0..9: valid length 10
    args = (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.tensor([9]))
    assert _op_inputs(res.ep, SPLITK, args)[4].tolist() == [10]


class NoRepeat(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)


class Dropout(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


class WrongRepeat(torch.nn.Module):
    """unsqueeze(1) -> expand -> reshape tiles heads (h -> h % H_kv), not the repeat_kv order."""

    def forward(self, q, k, v):
        def tile(x):
            b, h, s, d = x.shape
            return x[:, None].expand(b, 2, h, s, d).reshape(b, 2 * h, s, d)

        return F.scaled_dot_product_attention(q, tile(k), tile(v))


class EnableGQA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)


def _small(mod, h_kv, L=3, S=40, D=8):
    args = (torch.randn(1, 4, L, D), torch.randn(1, h_kv, S, D), torch.randn(1, h_kv, S, D))
    return G.to_functional(torch.export.export(mod, args)), args


def test_no_mask_no_repeat_and_default_scale():
    ep, args = _small(NoRepeat(), 4, L=1)
    res = SDPADispatch(threshold=32)(ep)
    assert [s["choice"] for s in res.stats.sites] == ["sdpa_decode_splitk"]
    node = next(n for n in res.ep.graph.nodes if n.target == SPLITK)
    assert node.args[3] is None and node.args[4] is None and node.args[5] == 1 / math.sqrt(8)
    torch.testing.assert_close(res.ep.module()(*args), ep.module()(*args), rtol=0, atol=0)


def test_enable_gqa_causal_prefill():
    ep, args = _small(EnableGQA(), 2, L=5, S=5)
    res = SDPADispatch()(ep)
    assert [s["choice"] for s in res.stats.sites] == ["sdpa"]
    node = next(n for n in res.ep.graph.nodes if n.target == TILED)
    assert node.args[6] is True
    torch.testing.assert_close(res.ep.module()(*args), ep.module()(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mod, h_kv, reason",
    [
        (Dropout(), 4, "dropout"),
        (WrongRepeat(), 2, "K/V expand not preceded by unsqueeze(2) (not the repeat_kv layout)"),
    ],
)
def test_skips_with_reason(mod, h_kv, reason):
    ep, _ = _small(mod, h_kv)
    res = SDPADispatch()(ep)
    assert not res.changed and res.stats.rewritten == 0
    assert dict(res.stats.skipped) == {reason: 1}


class HFRepeatKVFloatMask(torch.nn.Module):
    """transformers' repeat_kv (``x[:, :, None, :, :].expand(...).reshape(...)``), batch 2,
    an additive float mask (B, 1, 1, S) with -inf past each row's length."""

    def forward(self, q, k, v, mask):
        def repeat(x):
            b, h, s, d = x.shape
            return x[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)

        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask, scale=0.3)


def test_transformers_repeat_kv_and_float_mask_per_batch():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    mask = torch.zeros(2, 1, 1, 40)
    mask[0, ..., 23:] = float("-inf")
    mask[1, ..., 31:] = float("-inf")
    ep = G.to_functional(torch.export.export(HFRepeatKVFloatMask(), (q, k, v, mask)))
    res = SDPADispatch(threshold=32)(ep)
    assert [s["choice"] for s in res.stats.sites] == ["sdpa_decode_splitk"]
    targets = _targets(res.ep)
    assert aten.expand.default not in targets and aten.gt.Scalar in targets  # peeled; valid = mask > -inf
    torch.testing.assert_close(res.ep.module()(q, k, v, mask), ep.module()(q, k, v, mask), rtol=0, atol=0)
    assert _op_inputs(res.ep, SPLITK, (q, k, v, mask))[4].tolist() == [23, 31]  # valid length per batch row


def _op_inputs(ep, target, args):
    """Values of the arguments of the first ``target`` node when the program runs on ``args``."""
    gm = ep.module()
    node = next(n for n in gm.graph.nodes if n.target == target)
    seen = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n] = super().run_node(n)
            return seen[n]

    Record(gm).run(*args)
    return [seen.get(a, a) for a in node.args]


def test_bad_arguments():
    with pytest.raises(ValueError, match="fallback must be 'tiled' or 'aten'; got 'flash'"):
        SDPADispatch(fallback="flash")


# ----------------------------------------------------------------------------- Gemma 4


@functools.lru_cache(maxsize=None)
def gemma_programs():
    """tiny Gemma 4 (global caches S=24, sliding window 4 -> ring R=8), after RingBufferKVCache."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.export import export_methods
    from fxport.models.gemma4.model import Gemma4ForCausalLM, sliding_window_buffers
    from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache

    torch.manual_seed(0)
    config = get_preset("tiny")
    model = Gemma4ForCausalLM(config, max_seq_len=24).eval()
    ring = RingBufferKVCache(sliding_window_buffers(model))
    return config, {k: ring(ep, PassContext(method=k)).ep for k, ep in export_methods(model, max_prefill_chunk=5).items()}


def test_gemma4_splitk_exactly_at_global_layers_and_parity():
    config, ringed = gemma_programs()
    results = {k: SDPADispatch(threshold=16)(ep, PassContext(method=k)) for k, ep in ringed.items()}
    full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    for method, res in results.items():
        sites = res.stats.sites
        assert len(sites) == config.num_hidden_layers and res.stats.rewritten == len(sites)
        for site in sites:
            layer = int(site["module"].split(".")[2])  # model.layers.{i}.self_attn
            global_decode = method == "decode" and layer in full
            assert site["choice"] == ("sdpa_decode_splitk" if global_decode else "sdpa"), site
            assert site["kv"][2] == (24 if layer in full else 8)  # global cache 24 > 16; ring 8
        targets = _targets(res.ep)
        assert targets.count(SPLITK) == (len(full) if method == "decode" else 0)
        assert aten.scaled_dot_product_attention.default not in targets
    at_size = SDPADispatch(threshold=24)(ringed["decode"])  # global caches (24) no longer exceed it
    assert SPLITK not in _targets(at_size.ep) and {s["choice"] for s in at_size.stats.sites} == {"sdpa"}
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = run_steps(ringed, tokens, [5, 3])
    got = run_steps({k: r.ep for k, r in results.items()}, tokens, [5, 3])
    for step, (e, g) in enumerate(zip(expected, got)):
        # the CPU reference impls call aten SDPA on the same values: identical logits
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")


class RepeatInterleaveCache(torch.nn.Module):
    """ExecuTorch's Llama spelling: a cache written with index_copy_, GQA by
    ``repeat_interleave(n_rep, dim=1)`` in front of SDPA (n_rep = 1 too)."""

    def __init__(self, h_kv, s=40, d=8):
        super().__init__()
        self.n_rep = 4 // h_kv
        self.register_buffer("k_cache", torch.zeros(1, h_kv, s, d))
        self.register_buffer("v_cache", torch.zeros(1, h_kv, s, d))

    def forward(self, q, k, v, input_pos):
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        mask = (torch.arange(self.k_cache.shape[2])[None, :] <= input_pos[:, None])[None, None]
        kc, vc = self.k_cache.repeat_interleave(self.n_rep, dim=1), self.v_cache.repeat_interleave(self.n_rep, dim=1)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)


@pytest.mark.parametrize("h_kv", [2, 4])
def test_repeat_interleave_splitk_reads_the_unexpanded_cache(h_kv):
    g = torch.Generator().manual_seed(h_kv)
    args = (torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, h_kv, 1, 8, generator=g),
            torch.randn(1, h_kv, 1, 8, generator=g), torch.tensor([17]))
    ep = G.to_functional(torch.export.export(RepeatInterleaveCache(h_kv), args))
    res = SDPADispatch(threshold=32)(ep)
    assert [(s["choice"], s["gqa"], s["kv"], s["kv_buffer"]) for s in res.stats.sites] == [
        ("sdpa_decode_splitk", "repeat_interleave", (1, h_kv, 40, 8), "k_cache")]
    node = next(n for n in res.ep.graph.nodes if n.target == SPLITK)
    assert [a.target for a in node.args[1:3]] == [aten.index_copy.default] * 2  # the cache, not a copy
    assert aten.repeat_interleave.self_int not in _targets(res.ep)
    torch.testing.assert_close(res.ep.module()(*args), ep.module()(*args), rtol=0, atol=0)  # CPU reference: exact
