"""XNNPACK's quantization recipes: the names ``quant=`` accepts for the CPU backend.

Every ``nn.Linear`` a recipe selects becomes a torchao ``Int8DynamicActivationIntxWeightConfig``
linear (int8 dynamic per-token activations, int4 group-wise or int8 per-channel symmetric
weights): the form XNNPACK lowers to its ``qd8-f32-qb4w`` / ``qd8-f32-qc8w`` GEMMs.

Recipes accepted by ``quant=``: ``"8da4w"`` (every linear incl. the output head: int4
group 32), ``"8da4w-head8"`` (same, output head int8 per channel), and the names of
:mod:`fxport.quant.recipe` (``"default"``, ``"sensitive"``), mapped to what XNNPACK can run:
int4 weights symmetric (XNNPACK's qb4w has no zero point), HQQ as torchao's scale-only HQQ,
8-bit weights per channel. A tied output head takes the rule of the embedding it shares its
weight with. Weights no rule selects stay float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class XnnpackWeightQuant:
    """How one linear weight is quantized for XNNPACK.

    bits: 4 (group-wise, ``group_size`` columns per scale) or 8 (per output channel).
    hqq: choose scales with torchao's scale-only HQQ instead of min-max.
    """

    bits: int = 4
    group_size: int | None = 32
    hqq: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"XnnpackWeightQuant: bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and not self.group_size:
            raise ValueError("XnnpackWeightQuant: 4-bit weights need a group_size (e.g. 32)")

    def __str__(self) -> str:
        g = f"g{self.group_size}" if self.bits == 4 else "per-channel"
        return f"8da{self.bits}w {g}{' hqq' if self.hqq else ''}"

    def torchao_config(self):
        """The torchao config that produces this weight in XNNPACK's lowerable form."""
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
            IntxChooseQParamsAlgorithm,
        )

        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4 if self.bits == 4 else torch.int8,
            weight_granularity=PerGroup(self.group_size) if self.bits == 4 else PerAxis(0),
            weight_mapping_type=MappingType.SYMMETRIC,
            intx_choose_qparams_algorithm=(
                IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if self.hqq else IntxChooseQParamsAlgorithm.AFFINE
            ),
        )


# name -> (regex over the linear weight FQN, quant); first match wins; unmatched stay float.
XNNPACK_RECIPES: dict[str, tuple[tuple[str, XnnpackWeightQuant], ...]] = {
    "8da4w": ((r".*", XnnpackWeightQuant(4, 32)),),
    "8da4w-head8": (
        (r"(.*\.)?lm_head\.weight", XnnpackWeightQuant(8, None)),
        (r".*", XnnpackWeightQuant(4, 32)),
    ),
}


def recipe_names() -> list[str]:
    """Every name ``quant=`` accepts: XNNPACK's own and :mod:`fxport.quant.recipe`'s."""
    from fxport.quant.recipe import RECIPES

    return sorted(set(XNNPACK_RECIPES) | set(RECIPES))


def _from_quant_config(cfg: Any) -> XnnpackWeightQuant:
    """A :class:`fxport.quant.recipe.QuantConfig` mapped to what XNNPACK runs (see module doc)."""
    if cfg.bits == 8:
        return XnnpackWeightQuant(8, None, hqq=False)
    return XnnpackWeightQuant(4, cfg.group_size or 32, hqq=cfg.method == "hqq")


def _resolver(recipe: str, num_layers: int | None):
    """fqn -> XnnpackWeightQuant | None for recipe ``recipe``."""
    if recipe in XNNPACK_RECIPES:
        rules = XNNPACK_RECIPES[recipe]

        def pick(fqn: str):
            for pattern, q in rules:
                if re.fullmatch(pattern, fqn):
                    return q
            return None

        return pick
    from fxport.quant.recipe import RECIPES

    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of: {', '.join(recipe_names())}")
    qrecipe = RECIPES[recipe]

    def pick(fqn: str):
        cfg = qrecipe.config_for(fqn, num_layers)
        return None if cfg is None else _from_quant_config(cfg)

    return pick


@dataclass
class QuantReport:
    """What :func:`quantize_for_xnnpack` did: ``{linear FQN: description}`` and what stayed float."""

    recipe: str
    quantized: dict[str, str] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)  # fqn -> reason

    def summary(self) -> str:
        from collections import Counter

        kinds = Counter(self.quantized.values())
        parts = [f"{n} x {k}" for k, n in sorted(kinds.items())]
        return (
            f"quant {self.recipe}: {len(self.quantized)} linear(s) quantized ({', '.join(parts) or 'none'}), "
            f"{len(self.kept_float)} kept float"
        )


def quantize_for_xnnpack(model: nn.Module, recipe: str, *, num_layers: int | None = None) -> QuantReport:
    """Quantize ``model``'s linears in place for XNNPACK with recipe ``recipe``.

    A linear whose weight is tied to an embedding takes the rule of that embedding's weight
    FQN when no rule names the linear itself. A linear whose ``in_features`` is not a
    multiple of the group size stays float (reported in ``kept_float``).
    Raises ValueError for an unknown recipe (the message lists the valid names).
    """
    from torchao.quantization import quantize_

    if num_layers is None:
        cfg = getattr(model, "config", None)
        num_layers = getattr(cfg, "num_hidden_layers", None)
    pick = _resolver(recipe, num_layers)
    report = QuantReport(recipe)
    tied: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)

    groups: dict[XnnpackWeightQuant, set[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        fqn = f"{name}.weight"
        q = pick(fqn)
        if q is None:  # a tied head takes its embedding's rule
            for other in tied.get(id(mod.weight), []):
                if other != fqn and (q := pick(other)) is not None:
                    break
        if q is None:
            report.kept_float[name] = "no rule"
            continue
        if q.bits == 4 and mod.in_features % q.group_size:
            report.kept_float[name] = f"in_features {mod.in_features} not a multiple of group {q.group_size}"
            continue
        groups.setdefault(q, set()).add(name)
        report.quantized[name] = str(q)
    for q, names in groups.items():
        quantize_(model, q.torchao_config(), filter_fn=lambda m, fqn, names=names: fqn in names)
    return report
