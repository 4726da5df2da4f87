"""QKNormRopeAsOne on drawn Gemma-style attention layers, after CustomSDPA.

Each layer: ``q_norm`` / ``k_norm`` (RMSNorm over D per head) on the projections viewed as
(B, L, H, D), ``transpose(1, 2)``, RoPE ``t * cos + rotate_half(t) * sin`` with tables computed
from ``input_pos``, K/V caches written with ``index_copy_`` and causal SDPA, as fxport's Gemma
writes it. Drawn: head counts (GQA or not), D, the norm weights' spelling (a parameter,
``1 + param`` as Gemma, none), the tables' shape ((L, D) as fxport's model, (1, 1, L, D) as HF's
``unsqueeze(1)``), the RoPE operands' order, 1 or 2 layers.

Expected from the contract: every ``custom_sdpa`` site is matched and rewritten; one
``rms_norm`` and one ``rotate_half`` a layer where there were two; one ``fxport_qk_norm.<sdpa>``
(Hq + Hk, D) constant a site holding the query weight on each query head and the key weight on
each key head; no transpose left reading a norm; the logits of chunked prefill then decode equal
the CustomSDPA-only programs' within 1e-6 (the same arithmetic per element); a second run rewrites
nothing. Sites whose chains differ (norms with other eps, the key rotated with other tables) are
skipped with the reason and left as they were.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.export import Dim, export

from fxport.passes.base import PassContext
from fxport.passes.match import match
from fxport.passes.xnnpack import CustomSDPA, QKNormRopeAsOne
from fxport.passes.xnnpack.rotate_half_as_linear import ROTATE_HALF

from fxport.tests.passes.hypothesis_helpers import examples, ops
from fxport.tests.steps import run_steps

aten = torch.ops.aten
HIDDEN, VOCAB, S, CHUNK = 16, 40, 12, 4
CHUNKS = [CHUNK, 3, 1]
TOL = 1e-6


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class HeadNorm(nn.Module):
    """RMSNorm over D; ``spelling``: "param" (w), "1 + param" (Gemma's), "none"."""

    def __init__(self, d: int, spelling: str, eps: float, seed: int):
        super().__init__()
        self.spelling, self.eps = spelling, eps
        self.weight = nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 0.3)

    def forward(self, x):
        w = {"param": self.weight, "1 + param": 1.0 + self.weight, "none": None}[self.spelling]
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class Attention(nn.Module):
    def __init__(self, h_q, h_kv, d, spelling, swapped, k_eps, seed):
        super().__init__()
        self.h_q, self.h_kv, self.d, self.swapped = h_q, h_kv, d, swapped
        self.q_proj = nn.Linear(HIDDEN, h_q * d, bias=False)
        self.k_proj = nn.Linear(HIDDEN, h_kv * d, bias=False)
        self.v_proj = nn.Linear(HIDDEN, h_kv * d, bias=False)
        self.o_proj = nn.Linear(h_q * d, HIDDEN, bias=False)
        self.q_norm = HeadNorm(d, spelling, 1e-6, seed)
        self.k_norm = HeadNorm(d, spelling, k_eps, seed + 1)
        self.register_buffer("k_cache", torch.zeros(1, h_kv, S, d))
        self.register_buffer("v_cache", torch.zeros(1, h_kv, S, d))

    def rope(self, t, cos, sin):
        if self.swapped:  # operands and terms in the other order
            return sin * rotate_half(t) + cos * t
        return t * cos + rotate_half(t) * sin

    def forward(self, x, input_pos, mask, tables):
        B, L, _ = x.shape
        (q_cos, q_sin), (k_cos, k_sin) = tables
        q = self.rope(self.q_norm(self.q_proj(x).view(B, L, self.h_q, self.d)).transpose(1, 2), q_cos, q_sin)
        k = self.rope(self.k_norm(self.k_proj(x).view(B, L, self.h_kv, self.d)).transpose(1, 2), k_cos, k_sin)
        v = self.v_proj(x).view(B, L, self.h_kv, self.d).transpose(1, 2)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class Layer(nn.Module):
    def __init__(self, attn: Attention):
        super().__init__()
        self.self_attn = attn


class Decoder(nn.Module):
    """``table``: "LD" ((L, D) tables) or "11LD" ((1, 1, L, D)); ``k_table``: "same" or "other"
    (the key rotated with tables of another base)."""

    def __init__(self, n_layers=2, h_q=4, h_kv=1, d=8, spelling="1 + param", table="LD", swapped=False,
                 k_eps=1e-6, k_table="same"):
        super().__init__()
        torch.manual_seed(0)
        self.d, self.table, self.k_table = d, table, k_table
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(
            Layer(Attention(h_q, h_kv, d, spelling, swapped, k_eps, 10 * i)) for i in range(n_layers))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def tables(self, input_pos, base):
        inv = 1.0 / base ** (torch.arange(0, self.d, 2).float() / self.d)
        emb = (input_pos.float()[:, None] * inv[None, :]).repeat(1, 2)  # (L, D)
        cos, sin = emb.cos(), emb.sin()
        return (cos, sin) if self.table == "LD" else (cos[None, None], sin[None, None])

    def forward(self, tokens, input_pos):
        x = self.model.embed_tokens(tokens)
        mask = (torch.arange(S)[None, :] <= input_pos[:, None])[None, None]  # (1, 1, L, S) causal
        q_tables = self.tables(input_pos, 10000.0)
        k_tables = q_tables if self.k_table == "same" else self.tables(input_pos, 100.0)
        for layer in self.model.layers:
            x = x + layer.self_attn(x, input_pos, mask, (q_tables, k_tables))
        return self.lm_head(x)


def export_methods(model: Decoder) -> dict:
    def ex(n):
        args = (torch.zeros(1, n, dtype=torch.long), torch.arange(n))
        shapes = None if n == 1 else ({1: Dim("L", min=1, max=n)}, {0: Dim("L", min=1, max=n)})
        return export(model, args, dynamic_shapes=shapes).run_decompositions({})

    with torch.no_grad():
        return {"prefill": ex(CHUNK), "decode": ex(1)}


def through(progs: dict, pass_) -> dict:
    return {m: pass_(ep, PassContext(method=m)) for m, ep in progs.items()}


def logits(progs: dict) -> list[torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    return run_steps(progs, tokens, CHUNKS)


def rotate_halves(ep) -> int:
    return sum(match(ROTATE_HALF, n) is not None for n in ep.graph.nodes)


@examples(4)
@given(heads=st.sampled_from([(4, 1), (4, 2), (2, 2)]), d=st.sampled_from([8, 16]),
       spelling=st.sampled_from(["param", "1 + param", "none"]), table=st.sampled_from(["LD", "11LD"]),
       swapped=st.booleans(), n_layers=st.integers(1, 2))
def test_query_and_key_heads_normalized_and_rotated_as_one(heads, d, spelling, table, swapped, n_layers):
    h_q, h_kv = heads
    model = Decoder(n_layers, h_q, h_kv, d, spelling, table, swapped).eval()
    base = {m: r.ep for m, r in through(export_methods(model), CustomSDPA()).items()}
    results = through(base, QKNormRopeAsOne())
    for method, rec in results.items():
        assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (
            True, n_layers, n_layers, {}), method
        new = rec.ep
        assert ops(new)[aten.rms_norm.default] == n_layers and rotate_halves(new) == n_layers
        assert rotate_halves(base[method]) == 2 * n_layers
        assert not [n for n in new.graph.nodes if n.target in (aten.transpose.int, aten.permute.default)
                    and n.args[0].target == aten.rms_norm.default]
        weights = {k: v for k, v in new.constants.items() if k.startswith("fxport_qk_norm.")}
        if spelling == "none":
            assert not weights
        else:
            assert len(weights) == n_layers
            for i, W in enumerate(weights[k] for k in sorted(weights)):
                attn = model.model.layers[i].self_attn
                off = 1.0 if spelling == "1 + param" else 0.0
                want = torch.cat([(off + attn.q_norm.weight).expand(h_q, d), (off + attn.k_norm.weight).expand(h_kv, d)])
                assert W.shape == (h_q + h_kv, d) and torch.equal(W, want.detach())
    got = logits({m: r.ep for m, r in results.items()})
    for step, (e, g) in enumerate(zip(logits(base), got)):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=lambda m: f"step {step}: {m}")
    again = QKNormRopeAsOne()(results["decode"].ep, PassContext(method="decode"))
    assert (again.changed, again.stats.rewritten) == (False, 0)


@pytest.mark.parametrize("variant, reason", [
    ({"k_eps": 1e-5}, "query and key norms with different eps"),
    ({"k_table": "other"}, "query and key rotated with different tables"),
])
def test_sites_of_another_form_are_skipped_and_kept(variant, reason):
    model = Decoder(**variant).eval()
    base = {m: r.ep for m, r in through(export_methods(model), CustomSDPA()).items()}
    for method, rec in through(base, QKNormRopeAsOne()).items():
        assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (False, 2, 0, {reason: 2})
        assert ops(rec.ep)[aten.rms_norm.default] == 4 and rotate_halves(rec.ep) == 4


def test_without_custom_sdpa_nothing_matches():
    progs = export_methods(Decoder().eval())
    for method, rec in through(progs, QKNormRopeAsOne()).items():
        assert (rec.changed, rec.stats.matched) == (False, 0)
