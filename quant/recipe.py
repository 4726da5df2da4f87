"""Quantization recipes as data: ordered regex rules over weight FQNs, first match wins.

A :class:`QuantRule` says "weights whose FQN fully matches ``pattern`` (and whose layer index is
in ``layers``, when given) get ``config``"; ``config=None`` keeps the weight in float. A
:class:`QuantRecipe` is an ordered tuple of rules; weights no rule matches stay in float.
Layer indices come from the first ``layers.<i>.`` in the FQN; negative entries in ``layers``
count from the end and need ``num_layers``.

``str(recipe)`` prints a table. Gemma 4 recipes (HF parameter names):

* ``default``: int4 min-max group 32 for every attention / MLP linear, int8 per-channel for
  the embedding (tied with the output head in Gemma), everything else float.
* ``sensitive``: like the default but int4 HQQ, and ``v_proj`` / ``down_proj`` of the first
  two and last two layers kept at 8 bits (the layers most sensitive to 4-bit error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class QuantConfig:
    """How one weight is quantized. group_size None = one group per output channel."""

    bits: int = 4
    group_size: int | None = 32
    method: str = "minmax"  # "minmax" | "hqq"
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QuantConfig: bits must be 4 or 8, got {self.bits}")
        if self.method not in ("minmax", "hqq"):
            raise ValueError(f"QuantConfig: method must be 'minmax' or 'hqq', got {self.method!r}")

    def __str__(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        sym = " sym" if self.symmetric else ""
        return f"int{self.bits} {g} {self.method}{sym}"


@dataclass(frozen=True)
class QuantRule:
    pattern: str
    config: QuantConfig | None
    layers: tuple[int, ...] | None = None

    def matches(self, fqn: str, num_layers: int | None = None) -> bool:
        if not re.fullmatch(self.pattern, fqn):
            return False
        if self.layers is None:
            return True
        m = _LAYER.search(fqn)
        if m is None:
            return False
        wanted = set()
        for i in self.layers:
            if i < 0:
                if num_layers is None:
                    raise ValueError(
                        f"QuantRule {self.pattern!r}: negative layer {i} needs num_layers; "
                        "pass num_layers= to config_for / quantize_model"
                    )
                i += num_layers
            wanted.add(i)
        return int(m.group(1)) in wanted


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    rules: tuple[QuantRule, ...] = field(default_factory=tuple)

    def config_for(self, fqn: str, num_layers: int | None = None) -> QuantConfig | None:
        """The config of the first rule matching ``fqn`` (None: keep float)."""
        for rule in self.rules:
            if rule.matches(fqn, num_layers):
                return rule.config
        return None

    def __str__(self) -> str:
        rows = [f"QuantRecipe {self.name!r} (first match wins; unmatched weights stay float)"]
        width = max((len(r.pattern) for r in self.rules), default=7)
        for i, r in enumerate(self.rules):
            layers = "" if r.layers is None else f"  layers={list(r.layers)}"
            rows.append(f"  {i:2d}. {r.pattern:<{width}}  -> {r.config or 'float'}{layers}")
        return "\n".join(rows)


_LINEARS = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight"
_EMBED = r".*embed_tokens\.weight"

INT4_G32 = QuantConfig(bits=4, group_size=32, method="minmax")
INT4_G32_HQQ = QuantConfig(bits=4, group_size=32, method="hqq")
INT8_PER_CHANNEL = QuantConfig(bits=8, group_size=None, method="minmax", symmetric=True)
INT8_G32 = QuantConfig(bits=8, group_size=32, method="minmax", symmetric=True)

DEFAULT_RECIPE = QuantRecipe(
    "default",
    (
        QuantRule(_LINEARS, INT4_G32),
        QuantRule(_EMBED, INT8_PER_CHANNEL),
    ),
)

SENSITIVE_RECIPE = QuantRecipe(
    "sensitive",
    (
        QuantRule(r".*layers\.\d+\.(self_attn\.v_proj|mlp\.down_proj)\.weight", INT8_G32, layers=(0, 1, -2, -1)),
        QuantRule(_LINEARS, INT4_G32_HQQ),
        QuantRule(_EMBED, INT8_PER_CHANNEL),
    ),
)

RECIPES = {r.name: r for r in (DEFAULT_RECIPE, SENSITIVE_RECIPE)}


def get_recipe(name: str) -> QuantRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown quantization recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]
