"""Token samplers: greedy, temperature, top-k, top-p, all through one Gumbel-max draw.

Every function here is plain tensor ops on ``logits (B, V)`` with no Python branching on tensor
values and no ``torch.multinomial``, so :func:`gumbel_max_sample` (and the filters) can live
inside an exported decode method: the random numbers come in as a tensor ``uniform (B, V)`` and
the temperature as a tensor, so one program serves greedy and sampled decoding.

Gumbel-max: ``argmax(logits / T - log(-log(U)))`` with ``U ~ Uniform(0, 1)`` i.i.d. is an exact
draw from ``softmax(logits / T)``. Tokens filtered out (``-inf`` logits) are never drawn.

:class:`Sampler` is the runtime's configuration object: ``temperature == 0`` is greedy;
otherwise temperature, then top-k, then top-p filtering, then one Gumbel-max draw from a
seeded ``torch.Generator``. A NaN, infinite or negative temperature, a top-p outside (0, 1] and
a top-k below 1 are refused with ``ValueError`` when the sampler is built, before any token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "greedy",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "top_p_filter_fast",
    "gumbel_noise",
    "gumbel_max_sample",
    "Sampler",
    "GumbelMaxSampler",
]


def greedy(logits: Tensor) -> Tensor:
    """(B, V) -> (B,) int64: the highest logit (first one on ties, as ``torch.argmax``)."""
    return torch.argmax(logits, dim=-1)


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``logits / temperature``; temperature > 0 (a float or a (B,) / scalar tensor)."""
    if isinstance(temperature, Tensor) and temperature.dim() == 1:
        temperature = temperature[:, None]
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``.

    Ties at the k-th value are all kept (the kept set can exceed k only on exact ties).
    """
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches ``p`` (the most likely token is always kept), set the rest to ``-inf``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p: always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter_fast(logits: Tensor, p: float, candidates: int = 1024) -> Tensor:
    """:func:`top_p_filter`, the same kept set, without sorting the whole vocabulary when the
    ``candidates`` most likely tokens of every row already hold mass >= ``p``.

    Exact: a token outside those candidates has at least their mass ranked before it, so the
    nucleus drops it; inside them, ``mass_before`` is the same sum of the same full-vocabulary
    probabilities. Rows whose candidates hold less than ``p`` fall back to the full sort. A
    runtime path (it branches on tensor values); :func:`top_p_filter` is the exportable form.
    logits (B, V) float. A full sort of 262144 logits takes ~86 ms on one thread; this ~2 ms.
    """
    log_z = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (B, 1) over the whole vocabulary
    k = min(int(candidates), logits.shape[-1])
    while True:  # 1024, 16384, ... candidates: a flat row needs more before the full sort
        top, order = torch.topk(logits, k, dim=-1)  # (B, k), descending
        probs = torch.exp(top.float() - log_z)  # (B, k)
        if bool((probs.sum(dim=-1) >= p + 1e-5).all()):  # a margin over fp32 rounding of the sums
            break
        if k * 16 >= logits.shape[-1]:
            return top_p_filter(logits, p)
        k *= 16
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before < p)
    return logits.masked_fill(~keep, float("-inf"))


def gumbel_noise(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise ``-log(-log(U))`` from uniform (0, 1) samples (U = 0 gives -inf)."""
    return -torch.log(-torch.log(uniform))


def gumbel_max_sample(logits: Tensor, temperature: Tensor, uniform: Tensor) -> Tensor:
    """One token per row, export-friendly: Gumbel-max at ``temperature``, argmax where it is 0.

    logits (B, V) float; temperature scalar or (B,) float tensor (<= 0 means greedy);
    uniform (B, V) float in [0, 1). Returns (B,) int64.
    """
    t = temperature.reshape(-1, 1) if temperature.dim() else temperature.reshape(1, 1)
    scaled = logits.float() / torch.clamp(t, min=1e-6)  # (B, V)
    sampled = torch.argmax(scaled + gumbel_noise(uniform.float()), dim=-1)
    return torch.where(t.reshape(-1) > 0, sampled, torch.argmax(logits, dim=-1))


class GumbelMaxSampler(torch.nn.Module):
    """:func:`gumbel_max_sample` as a module, for appending to an exported decode method."""

    def forward(self, logits: Tensor, temperature: Tensor, uniform: Tensor) -> Tensor:
        return gumbel_max_sample(logits, temperature, uniform)


@dataclass
class Sampler:
    """Sampling configuration used by :func:`fxport.runtime.generate.generate`.

    temperature: 0 -> greedy (top_k / top_p / seed unused); must be finite and >= 0.
    top_k: keep the k most likely tokens (None: all).
    top_p: keep the nucleus of mass p, 0 < p <= 1 (None: all).
    seed: seeds the private ``torch.Generator`` (None: nondeterministic).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"Sampler: temperature={t!r} must be a finite number >= 0 "
                             "(0 is greedy; 0.7-1.0 is usual for sampling).")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampler: top_k={self.top_k} must be >= 1 (or None for no limit).")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # NaN fails this too
            raise ValueError(f"Sampler: top_p={self.top_p} must be in (0, 1] (or None).")
        self.generator = torch.Generator()
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0

    def filter(self, logits: Tensor) -> Tensor:
        """Temperature-scaled, top-k / top-p filtered logits (B, V) in fp32."""
        x = apply_temperature(logits.float(), self.temperature)
        if self.top_k is not None:
            x = top_k_filter(x, self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            x = top_p_filter_fast(x, self.top_p)
        return x

    def __call__(self, logits: Tensor) -> Tensor:
        """(B, V) or (V,) logits -> (B,) or () int64 token ids."""
        squeeze = logits.dim() == 1
        x = logits.reshape(1, -1) if squeeze else logits
        if self.is_greedy:
            out = greedy(x)
        else:
            u = torch.rand(x.shape, generator=self.generator, dtype=torch.float32)
            out = gumbel_max_sample(self.filter(x), torch.ones(()), u.to(x.device))
        return out[0] if squeeze else out
