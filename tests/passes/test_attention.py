"""passes/attention.py: what the recognizer returns for each GQA spelling and cache-write form.

Each case is a small hand-written attention module (a cache buffer written one way, read by
SDPA through one GQA spelling), exported with L dynamic in [1, 8] and normalized with
``run_decompositions({})`` as the pipeline does; the tests assert exactly which node is the
cache, the repetition, the chain of reader nodes and the write's form.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, export

from fxport.passes.attention import (
    NotRecognized,
    attention_sites,
    cache_write,
    find_cache_write,
    peel_kv,
    sdpa_args,
    set_sdpa_arg,
)
from fxport.passes.graph import bounds, upper_bound

aten = torch.ops.aten
H_Q, H_KV, D, S, MAX_L = 4, 2, 8, 16, 8


class Cached(nn.Module):
    """k/v caches (1, h_kv, S, D) written by ``write``, read through ``spell`` by SDPA."""

    def __init__(self, spell: str, write: str, h_kv: int = H_KV):
        super().__init__()
        self.spell, self.write, self.h_kv = spell, write, h_kv
        self.register_buffer("k_cache", torch.zeros(1, h_kv, S, D))
        self.register_buffer("v_cache", torch.zeros(1, h_kv, S, D))

    def forward(self, q, kv, pos, mask):
        k, v = kv[:, :self.h_kv], kv[:, self.h_kv:2 * self.h_kv]  # (1, h_kv, L, D)
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            if self.write == "index_copy":
                cache.index_copy_(2, pos, new)
            elif self.write == "index_put":
                cache[:, :, pos] = new
            else:  # "narrow": ExecuTorch's dynamic-shape Llama (start = input_pos[0].item())
                start = pos[0].item()
                torch._check(start >= 0)
                torch._check(start + new.shape[2] <= S)
                cache.narrow(2, start, new.shape[2]).copy_(new)
        kc, vc = self.k_cache, self.v_cache
        n = H_Q // self.h_kv
        if self.spell == "repeat_interleave":
            kc, vc = kc.repeat_interleave(n, dim=1), vc.repeat_interleave(n, dim=1)
        elif self.spell == "repeat_kv":  # transformers' repeat_kv
            def repeat_kv(t):
                b, h, s, d = t.shape
                return t[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
            kc, vc = repeat_kv(kc), repeat_kv(vc)
        elif self.spell == "repeat":  # tiled head order: not GQA's, never peeled
            kc, vc = kc.repeat(1, n, 1, 1), vc.repeat(1, n, 1, 1)
        elif self.spell == "cast_contiguous":
            kc, vc = kc.to(torch.float64).contiguous(), vc.to(torch.float64).contiguous()
            q = q.double()
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=self.spell == "enable_gqa")
        return out.float()


#: one layer per case: (GQA spelling, cache write, K/V heads)
LAYERS = {
    "repeat_interleave": ("repeat_interleave", "index_copy", H_KV),
    "repeat_kv": ("repeat_kv", "index_put", H_KV),
    "enable_gqa": ("enable_gqa", "narrow", H_KV),
    "repeat_interleave_1": ("repeat_interleave", "index_copy", H_Q),
    "repeat": ("repeat", "index_copy", H_KV),
    "cast_contiguous": ("cast_contiguous", "index_copy", H_Q),
}


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({name: Cached(*case) for name, case in LAYERS.items()})

    def forward(self, q, kv, pos, mask):
        return sum(layer(q, kv, pos, mask) for layer in self.layers.values())


@functools.lru_cache(maxsize=None)
def training_ir():
    L, Ld = 3, Dim("L", min=1, max=MAX_L)
    args = (torch.randn(1, H_Q, L, D), torch.randn(1, 2 * H_Q, L, D), torch.arange(L), torch.ones(1, 1, L, S, dtype=torch.bool))
    return export(Layers(), args, dynamic_shapes=({2: Ld}, {2: Ld}, {0: Ld}, {2: Ld}))


@functools.lru_cache(maxsize=None)
def functional():
    return training_ir().run_decompositions({})


def _sites(ep) -> dict:
    """{layer name: AttentionSite} (in layer order)."""
    sites = [site for _, site in attention_sites(ep.graph)]
    assert not any(isinstance(s, NotRecognized) for s in sites), sites
    return dict(zip(LAYERS, sites))


def _names(nodes) -> list[str]:
    return [n.target.__name__ for n in nodes]


# ------------------------------------------------------------------------ GQA spellings

CHAINS = {
    "repeat_interleave": ["repeat_interleave.self_int"],
    "repeat_kv": ["_unsafe_view.default", "clone.default", "expand.default", "unsqueeze.default"],
    "enable_gqa": [],
}


@pytest.mark.parametrize("layer", sorted(CHAINS))
def test_gqa_spellings_peel_to_the_cache_write(layer):
    ep = functional()
    site = _sites(ep)[layer]
    writes = {kv: find_cache_write(ep, f"layers.{layer}.{kv}_cache") for kv in "kv"}
    assert site.n_rep == H_Q // H_KV
    assert site.key.source is writes["k"].node and site.value.source is writes["v"].node
    assert (site.key.spelling, site.value.spelling) == (layer, layer)
    assert _names(site.key.chain) == CHAINS[layer] and _names(site.value.chain) == CHAINS[layer]
    assert site.args.enable_gqa == (layer == "enable_gqa")


def test_training_ir_reads_alike():
    """Before normalization the caches are buffers written in place; the chains are peeled the
    same way (repeat_kv's reshape not yet an _unsafe_view)."""
    sites = _sites(training_ir())
    assert {name: (s.n_rep, s.key.spelling, s.key.source.op) for name, s in sites.items()} == {
        "repeat_interleave": (2, "repeat_interleave", "call_function"),  # index_copy_ returns the cache
        "repeat_kv": (2, "repeat_kv", "call_function"),  # index_put_ too
        "enable_gqa": (2, "enable_gqa", "placeholder"),  # the buffer, written by copy_ into a narrow
        "repeat_interleave_1": (1, "repeat_interleave", "call_function"),
        "repeat": (1, "direct", "call_function"),
        "cast_contiguous": (1, "direct", "call_function"),
    }
    assert _names(sites["repeat_kv"].key.chain) == ["reshape.default", "expand.default", "unsqueeze.default"]


def test_repeat_interleave_once_is_peeled():
    site = _sites(functional())["repeat_interleave_1"]
    assert (site.n_rep, site.key.spelling, _names(site.key.chain)) == (1, "repeat_interleave", ["repeat_interleave.self_int"])
    assert site.key.source.target is aten.index_copy.default


def test_repeat_interleave_decomposed_is_the_repeat_kv_chain():
    from torch._decomp import core_aten_decompositions

    op = aten.repeat_interleave.self_int
    ep = training_ir().run_decompositions({op: core_aten_decompositions()[op]})
    sites = _sites(ep)
    for name, n_rep in (("repeat_interleave", 2), ("repeat_interleave_1", 1)):
        site = sites[name]
        assert (site.n_rep, site.key.spelling) == (n_rep, "repeat_kv")
        assert _names(site.key.chain) == ["view.default", "clone.default", "expand.default", "unsqueeze.default"]
        assert site.key.source is find_cache_write(ep, f"layers.{name}.k_cache").node


def test_cast_and_contiguous_between_cache_and_sdpa():
    site = _sites(functional())["cast_contiguous"]  # plain MHA read as float64
    assert site.key.source.target is aten.index_copy.default
    assert _names(site.key.chain) == ["_to_copy.default"]  # contiguous of a contiguous tensor is gone
    assert (site.n_rep, site.key.spelling) == (1, "direct")


def test_tiled_repeat_is_not_peeled():
    """``repeat(1, n, 1, 1)`` orders heads (0, 1, 0, 1), not GQA's (0, 0, 1, 1): the source is the
    repeated tensor (correct, not native GQA)."""
    site = _sites(functional())["repeat"]
    assert site.key.source.target is aten.repeat.default
    assert (site.n_rep, site.key.chain, site.key.spelling) == (1, (), "direct")


def test_heads_that_do_not_add_up_are_reported():
    site = _sites(functional())["repeat_interleave"]
    with pytest.raises(NotRecognized, match=r"^K/V heads 2 x 2 repeats do not give the query's 8 heads$"):
        peel_kv(site.args.key, h_q=8)
    with pytest.raises(NotRecognized, match=r"^K/V without a 4-d shape$"):
        peel_kv(_flat(site))


def _flat(site):
    """A rank-3 node of the graph (the index_put value k viewed as (H_kv, L, D))."""
    return next(n for n in site.node.graph.nodes if n.op == "call_function"
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 3)


# ------------------------------------------------------------------------ cache writes

WRITES = {  # layer -> (write form, kind in functional IR, kind in training IR)
    "repeat_interleave": ("index_copy", "index_copy", aten.index_copy_.default),
    "repeat_kv": ("index_put", "index_put", aten.index_put_.default),
    "enable_gqa": ("narrow", "slice_scatter", aten.copy_.default),
}


@pytest.mark.parametrize("layer", sorted(WRITES))
def test_cache_write_forms(layer):
    ep = functional()
    w = find_cache_write(ep, f"layers.{layer}.k_cache")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    assert (w.kind, w.dim, w.inplace, w.cache.name) == (WRITES[layer][1], 2, False, f"b_layers_{layer}_k_cache")
    assert upper_bound(ep, w.length) == MAX_L  # the most rows one call writes
    assert _sites(ep)[layer].key.source is w.node
    k = w.value if w.kind != "index_put" else w.value.args[0]  # index_put's value: k viewed as (H_kv, L, D)
    assert k.target is aten.slice.Tensor and k.args[0] is placeholders["kv"]
    if w.kind == "slice_scatter":
        # slice_scatter(cache, copy(slice(cache, 2, p, p + L), k), 2, p, p + L), p = pos[0].item()
        assert w.positions is None and w.start.target is aten.item.default
        assert _names(w.aux) == ["copy.default", "slice.Tensor"]
    else:
        assert w.positions is placeholders["pos"] and w.start is None


@pytest.mark.parametrize("layer", sorted(WRITES))
def test_training_ir_writes_are_in_place(layer):
    ep = training_ir()
    cache = next(n for n in ep.graph.nodes if n.name == f"b_layers_{layer}_k_cache")
    op = WRITES[layer][2]
    node = next(n for n in ep.graph.nodes if n.target is op and (n.args[0] is cache or n.args[0].args[0] is cache))
    w = cache_write(node)
    kind = "copy_slice" if op is aten.copy_.default else WRITES[layer][1]
    assert (w.kind, w.dim, w.inplace, w.cache) == (kind, 2, True, cache)


def test_unprovable_writes_are_reported():
    g = torch.fx.Graph()
    cache, pos, new = g.placeholder("cache"), g.placeholder("pos"), g.placeholder("new")
    cache.meta["val"], pos.meta["val"], new.meta["val"] = torch.zeros(1, 2, S, D), torch.arange(3), torch.zeros(1, 2, 3, D)
    acc = g.call_function(aten.index_put.default, (cache, [None, None, pos], new, True))
    two = g.call_function(aten.index_put.default, (cache, [None, pos, pos], new))
    other = g.call_function(aten.add.Tensor, (cache, new))
    expected = {acc: "index_put with accumulate=True", two: "index_put with more than one index tensor",
                other: "cache written by aten.add.Tensor"}
    for node, reason in expected.items():
        with pytest.raises(NotRecognized) as err:
            cache_write(node)
        assert str(err.value) == reason


def test_cache_read_before_its_write_is_reported():
    from fxport.passes.graph import clone_program

    ep = clone_program(functional())
    g = ep.graph
    buf = next(n for n in g.nodes if n.name == "b_layers_repeat_interleave_k_cache")
    first = next(n for n in g.nodes if n.op == "call_function")
    with g.inserting_before(first):
        extra = g.call_function(aten.sum.default, (buf,))
    assert extra in buf.users
    with pytest.raises(NotRecognized, match="^cache has readers other than its one write$"):
        find_cache_write(ep, "layers.repeat_interleave.k_cache")
    with pytest.raises(NotRecognized, match="^buffer not in program$"):
        find_cache_write(ep, "nope")


# ------------------------------------------------------------------------ SDPA arguments


def _sdpa_graph(args, kwargs):
    g = torch.fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    env = {"q": q, "k": k, "v": v, "m": m}
    args = tuple(env.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {n: env.get(a, a) if isinstance(a, str) else a for n, a in kwargs.items()}
    return g.call_function(aten.scaled_dot_product_attention.default, args, kwargs), env


def test_sdpa_args_positional_and_keyword_read_alike():
    pos, env = _sdpa_graph(("q", "k", "v", "m", 0.0, True), {"scale": 0.5, "enable_gqa": True})
    kw, env2 = _sdpa_graph(("q", "k", "v"), {"attn_mask": "m", "is_causal": True, "scale": 0.5, "enable_gqa": True})
    for node, e in ((pos, env), (kw, env2)):
        a = sdpa_args(node)
        assert (a.query, a.key, a.value, a.attn_mask) == (e["q"], e["k"], e["v"], e["m"])
        assert (a.dropout_p, a.is_causal, a.scale, a.enable_gqa) == (0.0, True, 0.5, True)
        assert a.scale_for(64) == 0.5
    bare, _ = _sdpa_graph(("q", "k", "v"), {"dropout_p": 0.1})
    a = sdpa_args(bare)
    assert (a.attn_mask, a.dropout_p, a.is_causal, a.scale, a.enable_gqa) == (None, 0.1, False, None, False)
    assert a.scale_for(64) == 1 / 8


def test_set_sdpa_arg_writes_where_the_argument_is():
    pos, env = _sdpa_graph(("q", "k", "v", "m"), {})
    kw, _ = _sdpa_graph(("q", "k", "v"), {"attn_mask": "m"})
    for node in (pos, kw):
        set_sdpa_arg(node, "attn_mask", env["q"])
        assert sdpa_args(node).attn_mask is env["q"]
    assert len(pos.args) == 4 and "attn_mask" in kw.kwargs
    with pytest.raises(NotRecognized, match=r"^not an SDPA: placeholder$"):
        sdpa_args(env["q"])


# ------------------------------------------------------------------------ symbol bounds


def test_bounds_of_static_dynamic_and_unbacked_sizes():
    """fxport.passes.graph.bounds / upper_bound, on this file's programs (they have every kind of size)."""
    ep = functional()
    w = find_cache_write(ep, "layers.enable_gqa.k_cache")
    assert bounds(ep, 7) == (7, 7) and upper_bound(ep, 7) == 7
    assert bounds(ep, w.length) == (1, MAX_L)  # s0 in [1, 8]
    # unbacked u0 = pos[0].item(), checked u0 >= 0 and u0 + L <= S; export's shape env holds u0 <= S - 2
    assert bounds(ep, w.start) == (0, S - 2)
    assert bounds(ep, w.length * 2 + 1) == (3, 2 * MAX_L + 1)  # an expression: bounded through its symbols
    assert upper_bound(ep, w.length * 2 + 1) == 2 * MAX_L + 1
    with pytest.raises(TypeError, match=r"^bounds: expected a size, got True$"):
        bounds(ep, True)
