"""CustomSDPA on a tiny decoder with the model contract's patterns.

The module (per layer: (1, H_kv, S, D) K/V cache buffers written with ``index_copy_`` (or
``cache[:, :, pos] = new``) at ``input_pos``, repeat_kv GQA with H_q = 4, H_kv = 2, SDPA with a
(1, 1, L, S) mask built from ``input_pos`` and ``arange(S)``) is exported as prefill (L dynamic
up to ``CHUNK``) and decode (L = 1). The rewritten programs run chunked prefill then decode
with their buffers carried from call to call (:func:`fxport.tests.steps.run_steps`); their
logits equal the unrewritten programs' at every step within ``TOL`` (float32: the kernel's
blocked softmax over ``start + L`` keys only reorders the sums).

Mask kinds, one per layer: "causal" (``k <= q``), an int W (sliding window ``k <= q < k + W``:
the prefix case when W < S, causal when W >= S), "all" (every query sees all S slots: skipped)
and "other" (causal and a (S,) ``keep`` input: skipped). ``mask="float"`` turns every mask
into an additive 0 / -inf one (HF's spelling: ``zeros(m.shape).masked_fill(~m, -inf)``).

The causal path over an ExecuTorch ``.pte`` is tested end to end by the tiny Gemma of
tests/lowering/test_xnnpack.py (its full layer goes through CustomSDPA); the prefix path is
lowered and run here (:func:`test_prefix_and_causal_paths_lowered_and_run_by_executorch`).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, export

from fxport.passes.base import PassContext, PassError
from fxport.passes.match import ancestors
from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache
from fxport.passes.xnnpack import CustomSDPA
from fxport.passes.xnnpack.custom_sdpa import llama_ops
from fxport.tests.steps import run_steps

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
HIDDEN, VOCAB, H_Q, H_KV, D, S, CHUNK = 16, 40, 4, 2, 8, 12, 4
TOL = 1e-5  # float32; observed <= 3e-7
CHUNKS = [CHUNK, 3, 1]  # prefill chunks, then decode to S
RING = "cache written at computed positions (e.g. a ring buffer)"


def cache_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{kv}_cache" for i in range(n_layers) for kv in "kv"]


class Attention(nn.Module):
    """write: "index_copy" (HF's ``index_copy_``) or "index_put" (``cache[:, :, pos] = new``)."""

    def __init__(self, S: int, h_q: int, h_kv: int, d: int, write: str):
        super().__init__()
        self.h_q, self.h_kv, self.d, self.write = h_q, h_kv, d, write
        self.q_proj = nn.Linear(HIDDEN, h_q * d, bias=False)
        self.k_proj = nn.Linear(HIDDEN, h_kv * d, bias=False)
        self.v_proj = nn.Linear(HIDDEN, h_kv * d, bias=False)
        self.o_proj = nn.Linear(h_q * d, HIDDEN, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, h_kv, S, d))
        self.register_buffer("v_cache", torch.zeros(1, h_kv, S, d))

    def forward(self, x, input_pos, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h_q, self.d).transpose(1, 2)  # (B, H_q, L, D)
        for cache, proj in ((self.k_cache, self.k_proj), (self.v_cache, self.v_proj)):
            new = proj(x).view(B, L, self.h_kv, self.d).transpose(1, 2)  # (B, H_kv, L, D)
            if self.write == "index_copy":
                cache.index_copy_(2, input_pos, new)
            else:
                cache[:, :, input_pos] = new
        n = self.h_q // self.h_kv

        def repeat_kv(t):  # (B, H_kv, S, D) -> (B, H_q, S, D)
            b, h, s, d = t.shape
            return t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)

        o = F.scaled_dot_product_attention(q, repeat_kv(self.k_cache), repeat_kv(self.v_cache), attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class Layer(nn.Module):
    def __init__(self, attn: Attention):
        super().__init__()
        self.self_attn = attn


class TinyDecoder(nn.Module):
    """``model.layers.{i}.self_attn.{k,v}_cache`` buffers; ``layers`` gives each layer's mask kind."""

    def __init__(self, layers=("causal", "causal"), mask="bool", S=S, h_q=H_Q, h_kv=H_KV, d=D, write="index_copy"):
        super().__init__()
        self.kinds, self.mask, self.S = tuple(layers), mask, S
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(Layer(Attention(S, h_q, h_kv, d, write)) for _ in layers)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens, input_pos, keep=None):
        x = self.model.embed_tokens(tokens)
        q_pos = input_pos[:, None]  # (L, 1)
        k_pos = torch.arange(self.S)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (L, S)
        masks = {}
        for kind in self.kinds:
            if kind == "causal":
                m = causal
            elif kind == "all":  # every slot, written or not
                m = (k_pos >= 0) & (q_pos >= 0)
            elif kind == "other":  # e.g. a padding mask given by the caller
                m = causal & keep[None, :]
            else:
                m = causal & (q_pos - k_pos < kind)
            m = m[None, None]  # (1, 1, L, S)
            if self.mask == "float":
                m = torch.zeros(m.shape, dtype=x.dtype).masked_fill(~m, float("-inf"))
            masks[kind] = m
        for layer, kind in zip(self.model.layers, self.kinds):
            x = x + layer.self_attn(x, input_pos, masks[kind])
        return self.lm_head(x)


def export_methods(model: TinyDecoder, chunk: int = CHUNK) -> dict:
    """{"prefill": L dynamic in [1, chunk], "decode": L = 1}; a (S,) ``keep`` input for "other" masks."""
    keep = "other" in model.kinds

    def ex(n):
        args = (torch.zeros(1, n, dtype=torch.long), torch.arange(n)) + ((torch.ones(model.S, dtype=torch.bool),) if keep else ())
        shapes = None
        if n > 1:
            L = Dim("L", min=1, max=n)
            shapes = ({1: L}, {0: L}) + ((None,) if keep else ())
        return export(model, args, dynamic_shapes=shapes).run_decompositions({})

    with torch.no_grad():
        return {"prefill": ex(chunk), "decode": ex(1)}


@functools.lru_cache(maxsize=None)
def programs(layers=("causal", "causal"), mask="bool", write="index_copy") -> tuple[TinyDecoder, dict]:
    torch.manual_seed(0)
    model = TinyDecoder(layers, mask, write=write).eval()
    return model, export_methods(model)


def rewrite(progs: dict, pass_: CustomSDPA | None = None) -> dict:
    """{method: PassResult}, both methods through one pass object (as the pipeline does)."""
    pass_ = pass_ or CustomSDPA()
    return {m: pass_(ep, PassContext(method=m)) for m, ep in progs.items()}


def feed_keep(method, tokens, start):
    return (tokens, torch.arange(start, start + tokens.shape[1]), torch.ones(S, dtype=torch.bool)), {}


def assert_parity(reference: dict, rewritten: dict, feed=None) -> None:
    """Logits of every step (chunked prefill ``CHUNKS`` then decode to S) equal within ``TOL``."""
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    kw = {"feed": feed} if feed else {}
    expected = run_steps(reference, tokens, CHUNKS, **kw)
    got = run_steps(rewritten, tokens, CHUNKS, **kw)
    assert len(got) == len(expected) == len(CHUNKS) + S - sum(CHUNKS)
    for step, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")


def custom_sdpas(ep) -> list:
    return [n for n in ep.graph.nodes if n.target == llama_ops().custom_sdpa.default]


def targets(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def cache_shapes(ep) -> dict[str, tuple]:
    tensors = {**ep.state_dict, **ep.constants}
    return {n: tuple(t.shape) for n, t in tensors.items() if n.endswith("_cache")}


def summary(stats) -> tuple:
    return stats.matched, stats.rewritten, dict(stats.skipped)


# --------------------------------------------------------------------------------- rewritten


@pytest.mark.parametrize(
    "layers, mask, write, is_causal, slices",
    [
        (("causal", "causal"), "bool", "index_copy", [True, True], 0),
        # ``cache[:, :, pos] = new``: index_put with an (H_kv, L, D) value (export drops B = 1)
        (("causal", "causal"), "bool", "index_put", [True, True], 0),
        ((S, S + 2), "bool", "index_copy", [True, True], 0),  # windows as long as the cache are causal
        # prefix case: one mask cut (shared by both layers) + a K and a V slice per layer
        ((3, 3), "bool", "index_copy", [False, False], 1 + 2 * 2),
        ((3, "causal"), "bool", "index_copy", [False, True], 1 + 2),  # Gemma's sliding + full layers
        ((3, "causal"), "float", "index_copy", [False, True], 1 + 2),  # (1, 1, L, S) zeros sized by the tokens
    ],
)
def test_rewritten_programs_match_at_every_step(layers, mask, write, is_causal, slices):
    model, progs = programs(layers, mask, write)
    results = rewrite(progs)
    for method, result in results.items():
        ep = result.ep
        assert result.changed, method
        assert summary(result.stats) == (2, 2, {}), method
        assert [(s["buffers"], s["cache_len"], s["n_rep"]) for s in result.stats.sites] == [
            ([f"model.layers.{i}.self_attn.k_cache", f"model.layers.{i}.self_attn.v_cache"], S, H_Q // H_KV)
            for i in range(2)]
        # custom_sdpa(q, k, v, start, mask, 0.0, is_causal, scale): scale 1 / sqrt(D) made explicit
        nodes = custom_sdpas(ep)
        assert [n.args[6] for n in nodes] == is_causal, method
        assert [n.args[7] for n in nodes] == [1 / math.sqrt(D)] * 2
        assert [n.args[4] is None for n in nodes] == is_causal  # a mask only in the prefix case
        assert SDPA not in targets(ep)
        assert targets(ep).count(aten.slice.Tensor) == slices, method
        for n in nodes:  # q (B, L, H_q, D); caches (B, S, H_kv, D), or their first start + L rows
            assert n.args[0].meta["val"].shape[2:] == (H_Q, D)
            assert n.args[1].meta["val"].shape[2:] == (H_KV, D) == n.args[2].meta["val"].shape[2:]
        assert cache_shapes(ep) == {name: (1, S, H_KV, D) for name in cache_names(2)}, method
        assert {ep.state_dict[n].dtype for n in cache_names(2)} == {torch.float32}
        assert all(not ep.state_dict[n].any() for n in cache_names(2))  # zero initial state
    assert_parity(progs, {m: r.ep for m, r in results.items()})


def test_a_window_reads_at_most_its_reach_plus_the_chunk():
    """Window 3 in a 12-slot cache (Gemma's sliding layer): the kernel gets rows
    ``start - min(start, 2) .. start + L - 1`` of each cache and those columns of the mask, so
    at most 3 + L - 1 rows wherever the chunk is (not ``start + L``); the bound is the slices'
    planned size (prefill chunks up to CHUNK, decode 1)."""
    import operator

    from fxport.passes.graph import upper_bound

    _, progs = programs((3, "causal"))
    for method, result in rewrite(progs).items():
        ep = result.ep
        window = next(n for n in custom_sdpas(ep) if not n.args[6])
        k, v, mask = window.args[1], window.args[2], window.args[4]
        assert [x.target for x in (k, v, mask)] == [aten.slice.Tensor] * 3, method
        lo = k.args[2]
        assert lo is v.args[2] is mask.args[2] and lo.target is operator.sub and lo.args[0] is window.args[3]
        back = lo.args[1]  # min(start, reach - 1) as its own scalar
        assert back.target is aten._local_scalar_dense.default
        assert back.args[0].target is aten.clamp.default and back.args[0].args[1:] == (None, 2)
        assert back.args[0].args[0] is window.args[3].args[0]  # clamps the pos[0] that start is read from
        rows = 3 + (CHUNK if method == "prefill" else 1) - 1
        assert [upper_bound(ep, x.meta["val"].shape[d]) for x, d in ((k, 1), (v, 1), (mask, 1))] == [rows] * 3, method


def test_second_run_changes_nothing():
    _, progs = programs((3, "causal"))
    once = rewrite(progs)
    twice = rewrite({m: r.ep for m, r in once.items()})
    for method in progs:
        assert once[method].changed and not twice[method].changed
        assert twice[method].ep is once[method].ep
        assert summary(twice[method].stats) == (0, 0, {})  # no SDPA left to match


# --------------------------------------------------------------------------------- left alone


@pytest.mark.parametrize(
    "layers, reason",
    [
        (("all", "causal"), "mask lets a query see slots not written yet"),
        (("other", "causal"), "mask depends on another input"),
    ],
)
def test_unprovable_mask_is_left_alone_and_the_rest_rewritten(layers, reason):
    _, progs = programs(layers)
    results = rewrite(progs)
    for method, result in results.items():
        assert summary(result.stats) == (2, 1, {reason: 1}), method
        assert [n.args[6] for n in custom_sdpas(result.ep)] == [True]
        sdpa, = (n for n in result.ep.graph.nodes if n.target == SDPA)  # layer 0's, on its (B, H, S, D) caches
        assert {n.name for n in ancestors([sdpa]) if n.name.startswith("b_")} == {
            "b_model_layers_0_self_attn_k_cache", "b_model_layers_0_self_attn_v_cache"}
        assert cache_shapes(result.ep) == {
            **{n: (1, H_KV, S, D) for n in cache_names(1)},
            **{n: (1, S, H_KV, D) for n in cache_names(2)[2:]}}, method
    assert_parity(progs, {m: r.ep for m, r in results.items()}, feed=feed_keep if "other" in layers else None)


def test_float64_caches_are_left_alone():
    """custom_sdpa takes float32 / bfloat16 / float16 only."""
    torch.manual_seed(0)
    model = TinyDecoder().double().eval()
    for method, ep in export_methods(model).items():
        result = CustomSDPA()(ep, PassContext(method=method))
        assert not result.changed and result.ep is ep
        assert summary(result.stats) == (2, 0, {"cache dtype other than float32 / bfloat16 / float16": 2}), method


def test_ring_buffer_cache_is_left_alone():
    """RingBufferKVCache first (Gemma's order): the ring's positions are computed (pos % R)."""
    _, progs = programs((3, "causal"))
    ring = RingBufferKVCache({name: 3 for name in cache_names(1)}, max_prefill_chunk=CHUNK)
    ringed = {m: ring(ep).ep for m, ep in progs.items()}
    results = rewrite(ringed)
    R = max(2 * 3, 3 + CHUNK - 1)
    for method, result in results.items():
        assert summary(result.stats) == (2, 1, {RING: 1}), method
        assert [n.args[6] for n in custom_sdpas(result.ep)] == [True]
        assert targets(result.ep).count(SDPA) == 1
        assert cache_shapes(result.ep) == {
            **{n: (1, H_KV, R, D) for n in cache_names(1)},
            **{n: (1, S, H_KV, D) for n in cache_names(2)[2:]}}, method
    assert_parity(progs, {m: r.ep for m, r in results.items()})


# --------------------------------------------------------------------------------- shared buffers


@pytest.mark.parametrize("order", [("prefill", "decode"), ("decode", "prefill")])
def test_methods_that_disagree_on_a_shared_cache_are_rejected(order):
    """Prefill's layer 0 has a causal mask (rewritable), decode's lets a query see every slot."""
    progs = {"prefill": programs(("causal", "causal"))[1]["prefill"], "decode": programs(("all", "causal"))[1]["decode"]}
    pass_ = CustomSDPA()
    first, second = order
    assert pass_(progs[first], PassContext(method=first)).changed
    with pytest.raises(PassError) as err:
        pass_(progs[second], PassContext(method=second))
    assert str(err.value) == (
        f"CustomSDPA: cache model.layers.0.self_attn.k_cache is shared by methods {first!r} and {second!r}; "
        "'prefill' moves it to custom_sdpa's (B, S, H, D) layout but 'decode' cannot (mask lets a query see slots "
        "not written yet). Give both methods the same attention, or build without the pass "
        "(fxport export --no-custom-sdpa)")


def test_separate_pass_objects_do_not_compare_methods():
    """The check is per pass object: the pipeline gives both methods one (cpu_passes)."""
    prefill = programs(("causal", "causal"))[1]["prefill"]
    decode = programs(("all", "causal"))[1]["decode"]
    assert CustomSDPA()(prefill, PassContext(method="prefill")).stats.rewritten == 2
    assert CustomSDPA()(decode, PassContext(method="decode")).stats.rewritten == 1


# --------------------------------------------------------------------------------- ExecuTorch


def test_prefix_and_causal_paths_lowered_and_run_by_executorch(tmp_path):
    """Sliding window 3 (prefix: sliced caches, float (L, start + L) mask) and a causal layer,
    lowered to XNNPACK and run by ``executorch.runtime`` with the LLM kernels loaded: the
    logits of every step equal the unrewritten programs' within 1e-4 (XNNPACK's fp32 GEMMs)."""
    from executorch.runtime import Runtime

    from fxport.contract import load_llm_kernels
    from fxport.tests.lowering.helpers import lower_fast

    _, progs = programs((3, "causal"))
    rewritten = {m: r.ep for m, r in rewrite(progs).items()}
    path = tmp_path / "custom_sdpa.pte"
    lower_fast(rewritten).save(path)
    load_llm_kernels()
    program = Runtime.get().load_program(path)
    methods = {m: program.load_method(m) for m in ("prefill", "decode")}  # one shared cache allocation

    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    expected = run_steps(progs, tokens, CHUNKS)
    steps = [("prefill", n) for n in CHUNKS] + [("decode", 1)] * (S - sum(CHUNKS))
    start = 0
    for step, ((method, n), e) in enumerate(zip(steps, expected, strict=True)):
        got = methods[method].execute([tokens[:, start:start + n].contiguous(), torch.arange(start, start + n)])[0]
        torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step} ({method}): {m}")
        start += n
