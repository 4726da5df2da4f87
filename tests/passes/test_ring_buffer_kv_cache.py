"""RingBufferKVCache on a tiny module with the model contract's patterns.

The module (cache buffer + ``index_copy_`` on dim 2 + repeat_kv + SDPA with a bool mask built
from ``input_pos`` and ``arange(S)``) is exported as prefill (L dynamic up to C) and decode
(L = 1); the rewritten programs run chunked prefill then decode with their buffers carried
from call to call, and their logits are compared with the unrewritten programs' at every step.
The module runs in float64 so that the only difference (softmax summed over R ring slots
instead of S positions) stays below 1e-10.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.export import Dim, export

from fxport.passes.base import PassError
from fxport.passes.ring_buffer_kv_cache import RingBufferKVCache, windows_from_config
from fxport.tests.steps import run_steps

SLIDING, FULL = "sliding_attention", "full_attention"
HIDDEN, VOCAB, H_Q, H_KV, D = 16, 40, 4, 2, 8
TOL = 1e-10  # float64: ring slots vs full cache only reorder the softmax sum


class Attention(nn.Module):
    """write: "index_copy" (HF), "index_put" (``cache[:, :, pos] = k``: gpt-fast, torchtune) or
    "narrow" (``cache.narrow(2, pos[0].item(), L).copy_(k)``: ExecuTorch's dynamic-shape Llama);
    gqa: "repeat_kv" (HF), "repeat_interleave" (ExecuTorch) or "enable_gqa"."""

    def __init__(self, max_seq_len: int, cache_layout: str = "BHSD", extra_reader: str | None = None,
                 write: str = "index_copy", gqa: str = "repeat_kv", h_kv: int = H_KV):
        super().__init__()
        self.layout, self.extra_reader, self.write, self.gqa, self.h_kv = cache_layout, extra_reader, write, gqa, h_kv
        self.max_seq_len = max_seq_len
        self.q_proj = nn.Linear(HIDDEN, H_Q * D, bias=False)
        self.k_proj = nn.Linear(HIDDEN, h_kv * D, bias=False)
        self.v_proj = nn.Linear(HIDDEN, h_kv * D, bias=False)
        self.o_proj = nn.Linear(H_Q * D, HIDDEN, bias=False)
        shape = (1, h_kv, max_seq_len, D) if cache_layout == "BHSD" else (1, max_seq_len, h_kv, D)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x, input_pos, mask):
        B, L, _ = x.shape
        old_sum = self.k_cache.sum() if self.extra_reader == "before" else 0.0
        q = self.q_proj(x).view(B, L, H_Q, D).transpose(1, 2)  # (B, H_q, L, D)
        k = self.k_proj(x).view(B, L, self.h_kv, D)
        v = self.v_proj(x).view(B, L, self.h_kv, D)
        if self.layout == "BHSD":
            for cache, new in ((self.k_cache, k.transpose(1, 2)), (self.v_cache, v.transpose(1, 2))):
                if self.write == "index_copy":
                    cache.index_copy_(2, input_pos, new)
                elif self.write == "index_put":
                    cache[:, :, input_pos] = new
                else:
                    start = input_pos[0].item()
                    torch._check(start >= 0)
                    torch._check(start + L <= self.max_seq_len)
                    cache.narrow(2, start, L).copy_(new)
            k, v = self.k_cache, self.v_cache  # (B, H_kv, S, D)
        else:
            self.k_cache.index_copy_(1, input_pos, k)
            self.v_cache.index_copy_(1, input_pos, v)
            k, v = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        n = H_Q // self.h_kv

        def repeat_kv(t):  # (B, H_kv, S, D) -> (B, H_q, S, D)
            b, h, s, d = t.shape
            return t.unsqueeze(2).expand(b, h, n, s, d).reshape(b, h * n, s, d)

        if self.gqa == "repeat_kv":
            o = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)
        elif self.gqa == "repeat_interleave":
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1),
                                               attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = self.o_proj(o.transpose(1, 2).reshape(B, L, -1))
        if self.extra_reader == "after":
            out = out + self.k_cache.sum()
        if self.extra_reader == "query":  # the written cache as an SDPA query too
            out = out + F.scaled_dot_product_attention(self.k_cache, self.k_cache, self.v_cache).sum()
        return out + old_sum


class Layer(nn.Module):
    def __init__(self, attn: Attention):
        super().__init__()
        self.self_attn = attn


class TinyLM(nn.Module):
    """``model.layers.{i}.self_attn.{k,v}_cache`` buffers, masks as in the model contract."""

    def __init__(self, window, max_seq_len, layer_types=(SLIDING, FULL, SLIDING), mask="bool", layer_kw=None,
                 **attn_kw):
        super().__init__()
        self.window, self.max_seq_len, self.layer_types, self.mask = window, max_seq_len, layer_types, mask
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        layer_kw = layer_kw or [{}] * len(layer_types)
        self.model.layers = nn.ModuleList(Layer(Attention(max_seq_len, **attn_kw, **kw)) for kw in layer_kw)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens, input_pos):
        x = self.model.embed_tokens(tokens)
        q_pos = input_pos[:, None]  # (L, 1)
        k_pos = torch.arange(self.max_seq_len)[None, :]  # (1, S)
        full = k_pos <= q_pos
        sliding = full & (q_pos - k_pos < self.window)
        masks = {FULL: full[None, None], SLIDING: sliding[None, None]}  # (1, 1, L, S)
        if self.mask == "float":
            masks = {t: torch.zeros(m.shape, dtype=x.dtype).masked_fill(~m, float("-inf")) for t, m in masks.items()}
        for layer, kind in zip(self.model.layers, self.layer_types):
            x = x + layer.self_attn(x, input_pos, masks[kind])
        return self.lm_head(x)


def sliding_buffers(model: TinyLM) -> dict[str, int]:
    return {
        f"model.layers.{i}.self_attn.{kv}_cache": model.window
        for i, kind in enumerate(model.layer_types)
        if kind == SLIDING
        for kv in "kv"
    }


def export_methods(model: nn.Module, max_chunk: int, dynamic: bool = True) -> dict:
    """{"prefill": L dynamic in [1, max_chunk] (static max_chunk if not dynamic), "decode": L = 1}."""
    def ex(n, dyn):
        tokens, pos = torch.zeros(1, n, dtype=torch.long), torch.arange(n)
        shapes = ({1: Dim("L", min=1, max=n)}, {0: Dim("L", min=1, max=n)}) if dyn else None
        return export(model, (tokens, pos), dynamic_shapes=shapes).run_decompositions({})

    return {"prefill": ex(max_chunk, dynamic and max_chunk > 1), "decode": ex(1, False)}


@functools.lru_cache(maxsize=None)
def tiny_programs(window: int, mask: str = "bool") -> tuple[TinyLM, dict]:
    """The tiny model (S = 4 * window + 4) exported with prefill chunks up to window + 1."""
    torch.manual_seed(window)
    model = TinyLM(window, 4 * window + 4, mask=mask).double().eval()
    return model, export_methods(model, window + 1)


@functools.lru_cache(maxsize=None)
def ringed(window: int, mask: str = "bool", ring_size: int | None = 0) -> tuple[dict, dict]:
    """(programs, stats per method) of the tiny model; ring_size 0 = the unrewritten programs."""
    model, programs = tiny_programs(window, mask)
    stats = {}
    if ring_size != 0:
        programs, stats = ring(programs, sliding_buffers(model), ring_size)
    return programs, stats


def ring(programs: dict, windows: dict, ring_size=None) -> tuple[dict, dict]:
    """Apply the pass to each method; returns (programs, stats per method)."""
    results = {k: RingBufferKVCache(windows, ring_size)(ep) for k, ep in programs.items()}
    return {k: r.ep for k, r in results.items()}, {k: r.stats for k, r in results.items()}


def assert_parity(reference: dict, rewritten: dict, tokens: torch.Tensor, chunks: list[int]) -> None:
    """Logits of every step equal (float64, tolerance ``TOL``)."""
    expected = run_steps(reference, tokens, chunks)
    got = run_steps(rewritten, tokens, chunks)
    assert len(got) == len(expected) == len(chunks) + tokens.shape[1] - sum(chunks)
    for step, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")


def buffer_shapes(ep) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in ep.state_dict.items() if name.endswith("_cache")}


# --------------------------------------------------------------------------------- parity


@given(
    window=st.sampled_from([2, 4]),
    extra=st.sampled_from([0, 2]),  # R = 2 * window + extra; 0 = the tightest ring for chunks <= W + 1
    data=st.data(),
)
@settings(max_examples=10, deadline=None)
def test_chunked_prefill_then_decode_matches_full_cache(window, extra, data):
    model, _ = tiny_programs(window)
    rewritten, stats = ringed(window, ring_size=2 * window + extra if extra else None)
    assert all(s.rewritten == 4 for s in stats.values())
    total = data.draw(st.integers(window + 1, model.max_seq_len), label="total length")
    prompt = data.draw(st.integers(1, total), label="prompt length")
    chunks = []
    while sum(chunks) < prompt:
        chunks.append(data.draw(st.integers(1, min(window + 1, prompt - sum(chunks))), label="chunk"))
    tokens = torch.randint(0, VOCAB, (1, total), generator=torch.Generator().manual_seed(total))
    assert_parity(ringed(window)[0], rewritten, tokens, chunks)


def test_boundary_chunk_r_minus_w_plus_1_matches():
    """Chunks of exactly R - W + 1 (= W + 1 for the default R = 2W), across wrap-arounds."""
    window = 4
    model, _ = tiny_programs(window)
    rewritten, _ = ringed(window, ring_size=None)
    assert buffer_shapes(rewritten["prefill"])["model.layers.0.self_attn.k_cache"] == (1, H_KV, 2 * window, D)
    tokens = torch.randint(0, VOCAB, (1, model.max_seq_len), generator=torch.Generator().manual_seed(0))
    assert_parity(ringed(window)[0], rewritten, tokens, [window + 1] * 3)


def test_additive_float_mask_matches():
    window = 2
    model, _ = tiny_programs(window, "float")
    rewritten, stats = ringed(window, "float", ring_size=None)
    assert stats["prefill"].rewritten == 4 and stats["decode"].rewritten == 4
    tokens = torch.randint(0, VOCAB, (1, model.max_seq_len), generator=torch.Generator().manual_seed(1))
    assert_parity(ringed(window, "float")[0], rewritten, tokens, [2, 1, 3])


# --------------------------------------------------------------------------------- refusals


def test_chunk_r_minus_w_plus_2_is_rejected():
    window = 4  # prefill exported with chunks up to 5: R = 7 is one slot short
    model, programs = tiny_programs(window)
    with pytest.raises(PassError) as err:
        RingBufferKVCache(sliding_buffers(model), ring_size=7)(programs["prefill"])
    assert str(err.value) == (
        "RingBufferKVCache: chunk 5 exceeds ring size 7 - window 4 + 1 = 4 for buffer "
        "model.layers.0.self_attn.k_cache; export with chunks <= 4 (fxport export --max-prefill-chunk 4) "
        "or pass ring_size >= 8 (--ring-size 8)"
    )
    # Decode (chunk 1) is fine with the same ring.
    assert RingBufferKVCache(sliding_buffers(model), ring_size=7)(programs["decode"]).changed


def test_static_chunk_sizes_the_ring_and_an_explicit_small_ring_is_rejected():
    torch.manual_seed(0)
    model = TinyLM(2, 12).double()
    prefill = export_methods(model, 4, dynamic=False)["prefill"]
    # default R = max(2W, W + C - 1) = max(4, 5)
    assert buffer_shapes(RingBufferKVCache(sliding_buffers(model))(prefill).ep)["model.layers.0.self_attn.k_cache"] == (
        1, H_KV, 5, D)
    with pytest.raises(PassError, match=r"^RingBufferKVCache: chunk 4 exceeds ring size 4 - window 2 \+ 1 = 3 "):
        RingBufferKVCache(sliding_buffers(model), ring_size=4)(prefill)


# --------------------------------------------------------------------------------- structure


def test_global_layers_untouched_and_methods_share_buffers():
    window = 2
    model, _ = tiny_programs(window)
    rewritten, stats = ringed(window, ring_size=None)
    S, R = model.max_seq_len, 2 * window
    expected = {
        f"model.layers.{i}.self_attn.{kv}_cache": (1, H_KV, R if kind == SLIDING else S, D)
        for i, kind in enumerate(model.layer_types)
        for kv in "kv"
    }
    for method in ("prefill", "decode"):
        assert buffer_shapes(rewritten[method]) == expected
        ep = rewritten[method]
        dtypes = {n: ep.state_dict[n].dtype for n in expected}
        assert set(dtypes.values()) == {torch.float64}
    # Global layer: its SDPA still reads the untouched (1, 1, L, S) mask.
    sdpas = [n for n in rewritten["decode"].graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert [tuple(n.args[3].meta["val"].shape) for n in sdpas] == [(1, 1, 1, R), (1, 1, 1, S), (1, 1, 1, R)]
    # Stats: per buffer bytes before/after (float64, 2 heads x 8 dims per position).
    sites = {s["buffer"]: s for s in stats["decode"].sites}
    assert sites["model.layers.2.self_attn.v_cache"]["bytes_before"] == H_KV * S * D * 8
    assert sites["model.layers.2.self_attn.v_cache"]["bytes_after"] == H_KV * R * D * 8
    assert (stats["decode"].matched, stats["decode"].rewritten, dict(stats["decode"].skipped)) == (4, 4, {})


def test_idempotent():
    window = 2
    model, programs = tiny_programs(window)
    once = RingBufferKVCache(sliding_buffers(model))(programs["prefill"])
    twice = RingBufferKVCache(sliding_buffers(model))(once.ep)
    assert once.changed and not twice.changed
    assert twice.ep is once.ep
    assert twice.stats.rewritten == 0
    assert dict(twice.stats.skipped) == {"cache length <= ring size (already a ring, or nothing to save)": 4}


def test_windows_from_config():
    config = SimpleNamespace(sliding_window=512, layer_types=[SLIDING, FULL, SLIDING])
    assert windows_from_config(SimpleNamespace(text_config=config)) == {
        "model.layers.0.self_attn.k_cache": 512,
        "model.layers.0.self_attn.v_cache": 512,
        "model.layers.2.self_attn.k_cache": 512,
        "model.layers.2.self_attn.v_cache": 512,
    }
    with pytest.raises(ValueError, match="pass windows="):
        RingBufferKVCache()


# --------------------------------------------------------------------------------- leave alone


def test_key_ringed_without_its_value_is_left_alone():
    model, programs = tiny_programs(2)
    result = RingBufferKVCache({"model.layers.0.self_attn.k_cache": 2})(programs["decode"])
    assert not result.changed
    assert dict(result.stats.skipped) == {"shares an SDPA with a cache that is not ringed alike": 1}


SHARED = "shares an SDPA with a cache that is not ringed alike"


@pytest.mark.parametrize(
    "kwargs, skipped",
    [
        # the value cache alone is fine, but shares its SDPA with the unprovable key cache
        ({"extra_reader": "before"}, {"cache has readers other than its one write": 1, SHARED: 1}),
        ({"extra_reader": "after"}, {"cache read by aten.sum.default": 1, SHARED: 1}),
        ({"extra_reader": "query"}, {"cache used by SDPA as query or mask": 1, "SDPA without attn_mask": 1}),
        ({"cache_layout": "BSHD"}, {"cache write not on dim 2 of a (B, H, S, D) cache": 2}),
    ],
)
def test_unprovable_caches_are_left_alone(kwargs, skipped):
    torch.manual_seed(0)
    model = TinyLM(2, 8, layer_types=(SLIDING,), **kwargs).double()
    decode = export_methods(model, 1, dynamic=False)["decode"]
    result = RingBufferKVCache(sliding_buffers(model))(decode)
    assert not result.changed and result.ep is decode
    assert dict(result.stats.skipped) == skipped


# --------------------------------------------------------------------------------- real model


def test_gemma4_tiny_chunked_prefill_then_decode_matches_full_cache():
    """fxport's own Gemma 4 (preset "tiny": sliding window 4, KV-shared last two layers,
    k_eq_v global layers), windows from its config, R = 8, chunks up to R - W + 1 = 5."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.export import export_methods as export_gemma
    from fxport.models.gemma4.model import Gemma4ForCausalLM, sliding_window_buffers

    torch.manual_seed(0)
    config = get_preset("tiny")
    model = Gemma4ForCausalLM(config, max_seq_len=16, max_batch_size=1).eval()
    programs = export_gemma(model, max_prefill_chunk=5)
    results = {k: RingBufferKVCache(config=config)(ep) for k, ep in programs.items()}
    rewritten = {k: r.ep for k, r in results.items()}

    # Owned sliding caches (layers 0, 1, 3) ringed; global layer 2 untouched; 4, 5 own none.
    assert RingBufferKVCache(config=config).windows.keys() >= sliding_window_buffers(model).keys()
    expected = {f"model.layers.{i}.self_attn.{kv}_cache": (1, 2, 8, 16) for i in (0, 1, 3) for kv in "kv"}
    expected |= {f"model.layers.2.self_attn.{kv}_cache": (1, 1, 16, 32) for kv in "kv"}
    for method, result in results.items():
        shapes = {n: tuple(t.shape) for n, t in rewritten[method].constants.items() if n.endswith("_cache")}
        shapes |= buffer_shapes(rewritten[method])
        assert shapes == expected, method
        assert (result.stats.matched, result.stats.rewritten) == (6, 6)
        assert dict(result.stats.skipped) == {"buffer not in program": 2}  # KV-shared layers 4, 5

    tokens = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    expected_logits = run_steps(programs, tokens, [5, 3, 5])
    for step, (e, g) in enumerate(zip(expected_logits, run_steps(rewritten, tokens, [5, 3, 5]))):
        # float32; the ring only reorders the softmax sum over the slots.
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


# --------------------------------------------------------------------------------- foreign spellings

FOREIGN_LAYERS = [  # (layer type, Attention kwargs): one cache-write form and GQA spelling each
    (SLIDING, {"write": "index_put", "gqa": "repeat_interleave"}),  # gpt-fast / torchtune write
    (SLIDING, {"write": "narrow", "gqa": "enable_gqa"}),  # ExecuTorch dynamic-shape write
    (SLIDING, {"write": "index_copy", "gqa": "repeat_interleave", "h_kv": H_Q}),  # repeat_interleave(1)
    (FULL, {"write": "index_put", "gqa": "repeat_kv"}),
]
FOREIGN_WINDOW, FOREIGN_CHUNK, FOREIGN_S = 2, 6, 16
FOREIGN_R = FOREIGN_WINDOW + FOREIGN_CHUNK - 1  # max(2W, W + C - 1) = 7: chunks larger than W + 1


@functools.lru_cache(maxsize=None)
def foreign_programs() -> tuple[TinyLM, dict]:
    torch.manual_seed(3)
    model = TinyLM(FOREIGN_WINDOW, FOREIGN_S, layer_types=tuple(t for t, _ in FOREIGN_LAYERS), mask="float",
                   layer_kw=[kw for _, kw in FOREIGN_LAYERS]).double().eval()
    return model, export_methods(model, FOREIGN_CHUNK)


def test_foreign_writes_and_gqa_spellings_are_ringed_with_r_from_the_program():
    model, programs = foreign_programs()
    ring_pass = RingBufferKVCache(sliding_buffers(model))  # no ring_size, no max_prefill_chunk
    results = {m: ring_pass(programs[m]) for m in ("prefill", "decode")}  # one object: one R for both
    for method, result in results.items():
        h_kv = [H_KV, H_KV, H_Q, H_KV]
        assert buffer_shapes(result.ep) == {
            f"model.layers.{i}.self_attn.{kv}_cache": (1, h_kv[i], FOREIGN_R if t == SLIDING else FOREIGN_S, D)
            for i, (t, _) in enumerate(FOREIGN_LAYERS) for kv in "kv"}, method
        sites = {s["buffer"].split(".")[2] + s["buffer"][-7]: s for s in result.stats.sites}
        assert {k: (s["write"], s["readers"], s["chunk"]) for k, s in sites.items()} == {
            "0k": ("index_put", ["repeat_interleave"], FOREIGN_CHUNK if method == "prefill" else 1),
            "0v": ("index_put", ["repeat_interleave"], FOREIGN_CHUNK if method == "prefill" else 1),
            "1k": ("slice_scatter", ["enable_gqa"], FOREIGN_CHUNK if method == "prefill" else 1),
            "1v": ("slice_scatter", ["enable_gqa"], FOREIGN_CHUNK if method == "prefill" else 1),
            "2k": ("index_copy", ["repeat_interleave"], FOREIGN_CHUNK if method == "prefill" else 1),
            "2v": ("index_copy", ["repeat_interleave"], FOREIGN_CHUNK if method == "prefill" else 1),
        }
        # the slice write (it cannot wrap) became an index_copy at positions % R
        targets = [n.target for n in result.ep.graph.nodes]
        assert torch.ops.aten.slice_scatter.default not in targets
        assert targets.count(torch.ops.aten.index_copy.default) == 4
    tokens = torch.randint(0, VOCAB, (1, FOREIGN_S), generator=torch.Generator().manual_seed(5))
    assert_parity(programs, {k: r.ep for k, r in results.items()}, tokens, [FOREIGN_CHUNK, 1, 5])


def test_ring_chosen_for_decode_first_refuses_a_larger_prefill():
    model, programs = foreign_programs()
    ring_pass = RingBufferKVCache(sliding_buffers(model))
    assert buffer_shapes(ring_pass(programs["decode"]).ep)["model.layers.0.self_attn.k_cache"][2] == 2 * FOREIGN_WINDOW
    with pytest.raises(PassError) as err:
        ring_pass(programs["prefill"])
    assert str(err.value) == (
        "RingBufferKVCache: buffer model.layers.0.self_attn.k_cache (window 2) was ringed to 4 slots when an "
        "earlier program (chunks up to 1) was rewritten, but this program writes chunks of 6, which need 7 slots; "
        "rewrite the method with the largest chunk first, or give every method the same max_prefill_chunk= or "
        "ring_size= (--ring-size)")
    # max_prefill_chunk makes the order irrelevant
    explicit = RingBufferKVCache(sliding_buffers(model), max_prefill_chunk=FOREIGN_CHUNK)
    shapes = {m: buffer_shapes(explicit(programs[m]).ep) for m in ("decode", "prefill")}
    assert shapes["decode"] == shapes["prefill"]
    assert shapes["decode"]["model.layers.1.self_attn.v_cache"] == (1, H_KV, FOREIGN_R, D)


# --------------------------------------------------------------------------------- the CLI's defaults


class _StopAfterPasses(RuntimeError):
    pass


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma3"])
def test_cli_export_with_default_options_rings_for_the_default_chunk(preset, tmp_path, monkeypatch, capsys):
    """``fxport export --preset P`` with default options (max prefill chunk 128, window 4):
    R = W + C - 1 = 131 in the program's one method (prefill, which also runs the decode steps).
    Lowering is stubbed out (it is tested in tests/lowering); the run stops right after the passes."""
    import fxport.lowering.xnnpack as xnnpack
    from fxport.cli import main
    from fxport.models.gemma4.config import get_preset

    seen = {}

    def lower(programs, **kwargs):
        seen.update(programs)
        raise _StopAfterPasses("stop after passes")

    monkeypatch.setattr(xnnpack, "lower", lower)
    assert main(["export", "--preset", preset, "--out", str(tmp_path / "m.pte"), "--quiet"]) == 1
    assert "_StopAfterPasses: stop after passes" in capsys.readouterr().err
    config = get_preset(preset)
    W, C = config.sliding_window, 128
    assert sorted(seen) == ["prefill"]
    for method in ("prefill",):
        ep = seen[method]
        shapes = {n: tuple(t.shape) for n, t in {**ep.state_dict, **ep.constants}.items() if n.endswith("_cache")}
        # the full caches hold 1,024 slots (dim 2; dim 1 in CustomSDPA's (B, S, H, D) layout); rings stay (B, H, R, D)
        ringed = {n: s[2] for n, s in shapes.items() if 1024 not in s}
        sliding = {i for i, t in enumerate(config.layer_types) if t == SLIDING}
        assert ringed and set(ringed.values()) == {max(2 * W, W + C - 1)}, method
        assert {int(n.split(".")[2]) for n in ringed} <= sliding


def test_cli_ring_size_too_small_is_refused_with_the_fix(tmp_path, capsys):
    """The CLI refuses ``--ring-size`` below W + C - 1 before any work (the pass's own error,
    naming the buffer, is asserted in test_chunk_r_minus_w_plus_2_is_rejected)."""
    from fxport.cli import main

    rc = main(["export", "--preset", "tiny", "--ring-size", "8", "--out", str(tmp_path / "m.pte"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("fxport export: error: ") and "131" in err and "--ring-size" in err, err


# --------------------------------------------------------------------------------- one ring per buffer


@given(window=st.integers(1, 5), chunk=st.integers(1, 13), prefill_first=st.booleans())
@example(window=5, chunk=13, prefill_first=True)  # the case: prefill 17 slots, decode took 10
@example(window=5, chunk=13, prefill_first=False)
@settings(max_examples=3, deadline=None)  # + the 2 examples; ~1 s per drawn case (two exports)
def test_separate_pass_objects_per_method_give_a_buffer_one_ring(window, chunk, prefill_first):
    """Each method rewritten by its own ``RingBufferKVCache(windows=...)`` through
    ``apply(..., method=...)``: both get the ring of the largest chunk when prefill goes first;
    decode first, prefill takes decode's ring when its chunks fit (C <= W + 1), and otherwise
    is refused with both sizes named -- never two shapes for one buffer."""
    from fxport.passes.pipeline import apply
    from fxport.passes.ring_buffer_kv_cache import default_ring_size

    model = TinyLM(window, 4 * window + chunk + 4, layer_types=(SLIDING,)).double().eval()
    windows = sliding_buffers(model)
    programs = export_methods(model, chunk, dynamic=False)  # prefill's chunk bound is its static length
    order = ("prefill", "decode") if prefill_first else ("decode", "prefill")
    first = apply(programs[order[0]], [RingBufferKVCache(windows)], method=order[0]).ep
    r = default_ring_size(window, chunk if prefill_first else 1)
    assert {s[2] for s in buffer_shapes(first).values()} == {r}
    if not prefill_first and chunk > window + 1:
        with pytest.raises(PassError) as err:
            apply(programs["prefill"], [RingBufferKVCache(windows)], method="prefill")
        assert str(err.value) == (
            f"RingBufferKVCache: buffer model.layers.0.self_attn.k_cache (window {window}) was ringed to {r} slots "
            f"when method 'decode' (chunks up to 1) was rewritten, but method 'prefill' writes chunks of {chunk}, "
            f"which need {window + chunk - 1} slots; rewrite the method with the largest chunk first, or give "
            f"every method the same max_prefill_chunk= or ring_size= (--ring-size)")
        return
    second = apply(programs[order[1]], [RingBufferKVCache(windows)], method=order[1]).ep
    assert buffer_shapes(second) == buffer_shapes(first)


def test_an_explicit_ring_size_that_differs_from_the_other_methods_is_refused():
    from fxport.passes.pipeline import apply

    model = TinyLM(2, 16, layer_types=(SLIDING,)).double().eval()
    programs = export_methods(model, 3, dynamic=False)
    apply(programs["prefill"], [RingBufferKVCache(sliding_buffers(model), ring_size=6)], method="prefill")
    with pytest.raises(PassError, match=r"^RingBufferKVCache: buffer model.layers.0.self_attn.k_cache \(window 2\) "
                                        r"was ringed to 6 slots when method 'prefill' \(chunks up to 3\) was "
                                        r"rewritten, but ring_size 5 is given for method 'decode'; one buffer has "
                                        r"one size in every method: pass ring_size=6$"):
        apply(programs["decode"], [RingBufferKVCache(sliding_buffers(model), ring_size=5)], method="decode")
    # The same method rewritten again is a new trial, not a second method: no conflict with itself.
    again = apply(programs["prefill"], [RingBufferKVCache(sliding_buffers(model), ring_size=8)], method="prefill").ep
    assert {s[2] for s in buffer_shapes(again).values()} == {8}
