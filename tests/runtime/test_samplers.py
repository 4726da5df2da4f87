"""Samplers: greedy, top-k, top-p, temperature and the Gumbel-max draw, checked against
their definitions (argmax, sorted probabilities, softmax frequencies)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.runtime.samplers import (
    GumbelMaxSampler,
    Sampler,
    greedy,
    gumbel_max_sample,
    top_k_filter,
    top_p_filter,
    top_p_filter_fast,
)


def _logits(seed: int, B: int = 3, V: int = 50) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@given(seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_greedy_is_argmax(seed):
    x = _logits(seed)
    assert torch.equal(greedy(x), x.argmax(-1))
    assert torch.equal(Sampler()(x), x.argmax(-1))
    assert int(Sampler()(x[0])) == int(x[0].argmax())  # (V,) input -> scalar


@given(seed=st.integers(0, 10_000), k=st.integers(1, 20))
@settings(max_examples=20, deadline=None)
def test_top_k_never_picks_outside_top_k(seed, k):
    x = _logits(seed)
    top = torch.topk(x, k, dim=-1).indices  # (B, k)
    kept = torch.isfinite(top_k_filter(x, k))
    assert torch.equal(kept.sum(-1), torch.full((3,), k))  # continuous logits: no ties
    s = Sampler(temperature=1.5, top_k=k, seed=seed)
    for _ in range(20):
        tok = s(x)  # (B,)
        assert all(int(tok[b]) in top[b].tolist() for b in range(3))


@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.99))
@settings(max_examples=25, deadline=None)
def test_top_p_keeps_smallest_nucleus_reaching_p(seed, p):
    x = _logits(seed)
    kept = torch.isfinite(top_p_filter(x, p))
    probs = torch.softmax(x, -1)
    for b in range(3):
        sp, order = torch.sort(probs[b], descending=True)
        n = int(kept[b].sum())
        # kept = exactly the n most likely tokens
        assert set(order[:n].tolist()) == set(torch.nonzero(kept[b]).flatten().tolist())
        assert float(sp[:n].sum()) >= p - 1e-6  # reaches p
        assert n == 1 or float(sp[: n - 1].sum()) < p + 1e-6  # and is the smallest such set


def test_top_p_always_keeps_the_most_likely_token():
    x = torch.tensor([[10.0, 0.0, 0.0]])
    assert torch.isfinite(top_p_filter(x, 1e-9)).tolist() == [[True, False, False]]


def test_temperature_to_zero_is_greedy():
    x = _logits(0, B=4, V=200)
    assert torch.equal(Sampler(temperature=0.0)(x), x.argmax(-1))
    assert torch.equal(Sampler(temperature=0)(x), x.argmax(-1))
    # a tiny positive temperature: logit gaps / T dwarf any Gumbel noise from float32 uniforms
    # (|noise| < 17); gaps here are > 1e-3, / 1e-6 -> > 1e3.
    gaps = torch.sort(x, -1, descending=True).values
    assert float((gaps[:, 0] - gaps[:, 1]).min()) > 1e-3
    s = Sampler(temperature=1e-6, seed=0)
    for _ in range(10):
        assert torch.equal(s(x), x.argmax(-1))


def test_gumbel_max_frequencies_match_softmax():
    """200k draws from softmax(logits / T) over 8 tokens: chi-square goodness of fit with 7
    degrees of freedom must stay under 24.32 (p = 0.001), seed fixed."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    T, N = 0.8, 200_000
    g = torch.Generator().manual_seed(1234)
    u = torch.rand(N, 8, generator=g)
    tok = gumbel_max_sample(logits.expand(N, 8), torch.tensor(T), u)
    counts = torch.bincount(tok, minlength=8).double()
    expected = torch.softmax(logits.double() / T, -1) * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, (chi2, counts.tolist(), expected.tolist())


def test_sampler_top_k_distribution_is_renormalized_softmax():
    """Sampler(T, top_k=3): frequencies follow softmax over the 3 kept tokens (chi-square, 2
    d.o.f., threshold 13.82 = p 0.001), 20k draws, seed fixed."""
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.5, 2.0, -1.0]])
    s = Sampler(temperature=1.3, top_k=3, seed=7)
    draws = s(logits.expand(20_000, 6))  # one batched call: 20k independent rows
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    kept = torch.tensor([1, 3, 4])
    expected = torch.softmax(logits[0, kept].double() / 1.3, -1) * 20_000
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, (chi2, counts.tolist())


def test_gumbel_max_per_row_temperature_and_greedy_rows():
    x = _logits(3, B=2, V=30)
    u = torch.rand(2, 30, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0])
    out = gumbel_max_sample(x, t, u)
    assert int(out[0]) == int(x[0].argmax())  # temperature 0 -> argmax, noise ignored
    assert int(out[1]) == int((x[1] - torch.log(-torch.log(u[1]))).argmax())


def test_gumbel_max_sampler_exports_and_matches_eager():
    x = _logits(5, B=1, V=64)
    u = torch.rand(1, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.7)
    ep = torch.export.export(GumbelMaxSampler(), (x, t, u)).run_decompositions({})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    # no data-dependent ops: no host sync, no sampling kernel without a tensor-input RNG
    data_dependent = ("multinomial", "_assert_scalar", "item", "nonzero", "_local_scalar_dense")
    assert not any(d in s for s in targets for d in data_dependent), targets
    for seed in range(5):
        u = torch.rand(1, 64, generator=torch.Generator().manual_seed(seed))
        for temp in (0.0, 0.7, 2.0):
            tt = torch.tensor(temp)
            assert torch.equal(ep.module()(x, tt, u), gumbel_max_sample(x, tt, u))


def test_sampler_seed_is_reproducible():
    x = _logits(9, B=1, V=100)
    a = [int(Sampler(temperature=1.0, seed=42)(x)[0]) for _ in range(3)]
    s1, s2 = Sampler(temperature=1.0, top_p=0.9, seed=3), Sampler(temperature=1.0, top_p=0.9, seed=3)
    assert [int(s1(x)[0]) for _ in range(10)] == [int(s2(x)[0]) for _ in range(10)]
    assert len(set(a)) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "Sampler: top_k=0 must be >= 1 (or None for no limit)."),
    ({"top_p": 0.0}, "Sampler: top_p=0.0 must be in (0, 1] (or None)."),
    ({"top_p": 1.5}, "Sampler: top_p=1.5 must be in (0, 1] (or None)."),
    ({"top_p": float("nan")}, "Sampler: top_p=nan must be in (0, 1] (or None)."),
    ({"top_p": -0.1}, "Sampler: top_p=-0.1 must be in (0, 1] (or None)."),
    ({"temperature": float("nan")},
     "Sampler: temperature=nan must be a finite number >= 0 (0 is greedy; 0.7-1.0 is usual for sampling)."),
    ({"temperature": float("inf")},
     "Sampler: temperature=inf must be a finite number >= 0 (0 is greedy; 0.7-1.0 is usual for sampling)."),
    ({"temperature": -1.0},
     "Sampler: temperature=-1.0 must be a finite number >= 0 (0 is greedy; 0.7-1.0 is usual for sampling)."),
])
def test_sampler_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError) as e:
        Sampler(**({"temperature": 1.0} | kwargs))
    assert str(e.value) == message


def test_gumbel_noise_is_standard_gumbel():
    """Mean of Gumbel(0, 1) is the Euler-Mascheroni constant (0.5772), variance pi^2 / 6;
    500k samples: tolerance 0.01 (>5 standard errors)."""
    from fxport.runtime.samplers import gumbel_noise

    g = gumbel_noise(torch.rand(500_000, generator=torch.Generator().manual_seed(0)).double())
    assert abs(float(g.mean()) - 0.5772156649) < 0.01
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.02


@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.999), candidates=st.sampled_from([1, 4, 16, 1000]),
       scale=st.sampled_from([0.5, 3.0, 12.0]))
@settings(max_examples=40, deadline=None)
def test_top_p_filter_fast_keeps_the_same_set(seed, p, candidates, scale):
    """The candidate prefilter keeps exactly top_p_filter's set, whether the candidates hold the
    nucleus (peaked logits) or the row falls back to the full sort (flat logits, few candidates).
    (Sampler applies top-p only for p < 1.)"""
    x = _logits(seed) * scale  # (3, V)
    fast = top_p_filter_fast(x, p, candidates=candidates)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(top_p_filter(x, p)))
    assert torch.equal(fast[torch.isfinite(fast)], x[torch.isfinite(fast)])  # kept logits unchanged
