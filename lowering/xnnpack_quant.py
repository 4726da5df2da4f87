"""XNNPACK's quantization recipes: the names ``quant=`` accepts for the CPU backend.

Every ``nn.Linear`` a recipe selects becomes a torchao ``Int8DynamicActivationIntxWeightConfig``
linear (int8 dynamic per-token activations, int4 group-wise or int8 per-channel symmetric
weights): the form XNNPACK lowers to its ``qd8-f32-qb4w`` / ``qd8-f32-qc8w`` GEMMs. A recipe
may also quantize the token embedding to a lookup ExecuTorch's quantized kernels run
(``quantized_decomposed.embedding_4bit`` / ``embedding_byte``, :mod:`fxport.quant.embedding`);
a ``.pte`` holding one needs ``import executorch.kernels.quantized`` before it is loaded.

Recipes accepted by ``quant=`` (``python -c "from fxport.lowering.xnnpack_quant import
describe; print(describe())"`` prints them):

* ``"balanced"`` (fxport's CPU default, :data:`DEFAULT_RECIPE`): activation smoothing
  (:mod:`fxport.quant.smoothing`, alpha 0.5, calibrated on 1,022 tokens of Python's
  documentation), each MLP's 64 outlier channels on a branch with a float32 down projection
  (:mod:`fxport.quant.outlier_split`: the activation rounding at ``down_proj``'s input was half
  the error; mean KL 0.0114 -> 0.0078, top-1 94.2% -> 96.0%, +2.2 MB a token), then every other
  linear int8 per channel, the output head too, and the embedding
  lookup reads the int8 head's own codes and scales, divided by the head's smoothing scale after
  the lookup (:meth:`fxport.quant.embedding.QuantizedEmbedding.from_int8_linear`: Gemma ties
  them, so they are one table). The Gemma 3 270M Q4_K_M GGUF keeps its layers at Q5_0 / Q8_0 /
  Q6_K / Q4_K and its tied head at Q8_0: int8 per channel holds those (measured: int8 weights
  alone cost mean KL 0.005, llama.cpp's own figure); the int8 per-token activations cost the
  rest (0.018 alone), which smoothing halves. The program keeps its weights in a ``.ptd`` beside
  the ``.pte``, where the shared table is stored once
  (:func:`fxport.lowering.xnnpack.shared_tables`): 1.07x the GGUF, where a separate int8 lookup
  made two copies of the 262144 x 640 table (1.73x). Measured (eager, bench/quality.py texts,
  llama.cpp 10.84 / 11.55): separate lookup ppl 10.91 / 11.53, KL 0.012, top-1 94.1%; shared,
  head unsmoothed 10.93 / 11.57, KL 0.014, 93.2%; shared, head smoothed and the lookup divided
  by its scale (shipped) 10.96 / 11.54, KL 0.011, 94.3%.
* ``"compact"``: smoothed int8 linears (head included, smoothed) with a separate int4 g64
  asymmetric embedding lookup: the ``.pte`` is 1.48x the GGUF (375.5 MB) at mean KL 0.040
  (eager; the int4 table costs +0.03 nats). Superseded for size by ``balanced``'s shared table.
* ``"8da8w"``: every linear int8 per channel, embedding float. ``"8da4w"``: every linear
  incl. the output head int4 g32. ``"8da4w-head8"``: the same with the head int8.
* the names of :mod:`fxport.quant.recipe` (``"default"``, ``"sensitive"``), mapped to what
  XNNPACK can run: int4 weights symmetric (XNNPACK's qb4w has no zero point), HQQ as torchao's
  scale-only HQQ, 8-bit weights per channel. A tied output head takes the rule of the
  embedding it shares its weight with.

The ``"fast"`` recipe (int4 g32 HQQ grid + GPTQ for the MLP and q/k/o, int8 v_proj, head and
layers 3, 5, 11, 17) was dropped on 2026-12-05 (issue 24): every int4 variant on Gemma 3 270M
costs far more than 5% perplexity (eager, docs/benchmarks.md: head int4 g32 HQQ +7% / KL 0.076,
gate/up int4 +6% / 0.086, ``fast`` itself 12.55 / 12.79 vs llama.cpp 10.84 / 11.55, +16% / +11%,
KL 0.143), and its bytes (236 MB a token vs ``balanced``'s 272 MB; the int8 head's 168 MB
dominates) cap its decode gain at ~1.15x ``balanced``, not 2x; ``balanced`` decodes faster
than ``fast`` did in every recorded run. GPTQ rounding (:mod:`fxport.quant.gptq`) stays
available to a recipe of your own: ``XnnpackRecipe(..., gptq=True)`` re-rounds its int4 linears
on Hessians from the calibration text (give :func:`quantize_for_xnnpack` a tokenizer).

Weights no rule selects stay float. ``IntxWeightOnlyConfig`` (weight-only int8) is never used:
XNNPACK delegates it but returned wrong numbers (rel. error ~3e3, ../shared/DESIGN.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxport.quant.smoothing import CALIBRATION_TOKENS, DEFAULT_ALPHA

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


@dataclass(frozen=True)
class XnnpackRecipe:
    """A CPU recipe: ordered ``(regex over linear weight FQN, quant or None=float)`` rules
    (first match wins, unmatched linears stay float) and the embedding's quantized lookup
    (``(bits, group_size)`` or None: float table)."""

    name: str
    rules: tuple[tuple[str, XnnpackWeightQuant | None], ...]
    embedding: tuple[int, int | None] | None = None
    doc: str = ""
    smooth: float | None = None  # SmoothQuant alpha (fxport.quant.smoothing); None: no smoothing
    gptq: bool = False  # GPTQ rounding (fxport.quant.gptq) for the 4-bit linears
    calibration_tokens: int = CALIBRATION_TOKENS  # tokens of the calibration text (smoothing / GPTQ)
    # The lookup reads the int8 head's own codes and scales (divided by the head's smoothing
    # scale): one table in the program's weights file instead of two copies (leave ``embedding`` None).
    lookup_from_head: bool = False
    # Per gated MLP, this many intermediate channels (the largest calibration absmax at down_proj's
    # input, after smoothing) on a branch whose down projection stays float32
    # (fxport.quant.outlier_split); 0: none. Needs the calibration text, like smoothing.
    outlier_channels: int = 0

    def pick(self, fqn: str) -> XnnpackWeightQuant | None | bool:
        """The quant of the first rule matching ``fqn``; None: a rule keeps it float; False: no rule."""
        for pattern, q in self.rules:
            if re.fullmatch(pattern, fqn):
                return q
        return False


INT8_PC = XnnpackWeightQuant(8, None)
INT4_G32 = XnnpackWeightQuant(4, 32)
INT4_G32_HQQ = XnnpackWeightQuant(4, 32, hqq=True)
_HEAD = r"(.*\.)?lm_head\.weight"
# balanced's float outlier channels per MLP (fxport.quant.outlier_split; Gemma 3 270M eager, mean
# KL to fp32: k = 0 0.0114, 8 0.0089, 32 0.0087, 64 0.0078)
OUTLIER_CHANNELS = 64

DEFAULT_RECIPE = XnnpackRecipe(
    "balanced",
    ((r".*", INT8_PC),),
    doc="every linear int8 per channel, activations smoothed, each MLP's 64 outlier channels with a float "
        "down projection; embedding lookup from the head's int8 codes (one table, weights in a .ptd beside the .pte)",
    smooth=DEFAULT_ALPHA,
    lookup_from_head=True,
    outlier_channels=OUTLIER_CHANNELS,
)
COMPACT_RECIPE = XnnpackRecipe(
    "compact",
    ((r".*", INT8_PC),),
    embedding=(4, 64),
    doc="every linear (head untied) int8 per channel, activations smoothed; embedding int4 g64 lookup",
    smooth=DEFAULT_ALPHA,
)

XNNPACK_RECIPES: dict[str, XnnpackRecipe] = {
    r.name: r
    for r in (
        DEFAULT_RECIPE,
        COMPACT_RECIPE,
        XnnpackRecipe("8da8w", ((r".*", INT8_PC),), doc="every linear int8 per channel"),
        XnnpackRecipe("8da4w", ((r".*", INT4_G32),), doc="every linear incl. the head int4 g32"),
        XnnpackRecipe("8da4w-head8", ((_HEAD, INT8_PC), (r".*", INT4_G32)), doc="int4 g32, head int8"),
    )
}


def describe() -> str:
    """One line per XNNPACK recipe: name and what it quantizes how."""
    return "\n".join(f"{r.name:<12} {r.doc}" for r in XNNPACK_RECIPES.values())


def recipe_names() -> list[str]:
    """Every name ``quant=`` accepts: XNNPACK's own and :mod:`fxport.quant.recipe`'s."""
    from fxport.quant.recipe import RECIPES

    return sorted(set(XNNPACK_RECIPES) | set(RECIPES))


def _from_quant_config(cfg: Any) -> XnnpackWeightQuant:
    """A :class:`fxport.quant.recipe.QuantConfig` mapped to what XNNPACK runs (see module doc)."""
    if cfg.bits == 8:
        return XnnpackWeightQuant(8, None, hqq=False)
    return XnnpackWeightQuant(4, cfg.group_size or 32, hqq=cfg.method == "hqq")


def check_recipe_name(name: str) -> None:
    """ValueError naming every recipe ``quant=`` accepts when ``name`` is none of them."""
    if name not in recipe_names():
        raise ValueError(f"unknown quantization recipe {name!r}; choose one of: {', '.join(recipe_names())}")


def _resolver(recipe: str | XnnpackRecipe, num_layers: int | None):
    """fqn -> XnnpackWeightQuant | None for recipe ``recipe``."""
    if isinstance(recipe, XnnpackRecipe) or recipe in XNNPACK_RECIPES:
        r = recipe if isinstance(recipe, XnnpackRecipe) else XNNPACK_RECIPES[recipe]

        def pick(fqn: str):
            q = r.pick(fqn)
            return None if q is False else q

        return pick
    from fxport.quant.recipe import RECIPES

    check_recipe_name(recipe)
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
    embedding: str | None = None  # the quantized lookup, when the recipe has one
    smoothing: str | None = None  # what activation smoothing did
    gptq: str | None = None  # what GPTQ rounding did
    outliers: str | None = None  # what the outlier-channel split did
    calibration: str | None = None  # the calibration text used (or why calibration was skipped)

    def summary(self) -> str:
        from collections import Counter

        kinds = Counter(self.quantized.values())
        parts = [f"{n} x {k}" for k, n in sorted(kinds.items())]
        emb = f"; embedding {self.embedding}" if self.embedding else ""
        smooth = "".join(f"; {x}" for x in (self.smoothing, self.outliers, self.gptq) if x)
        if self.calibration and self.calibration.startswith("skipped"):
            smooth += f"; calibration {self.calibration}"
        return (
            f"quant {self.recipe}: {len(self.quantized)} linear(s) quantized ({', '.join(parts) or 'none'}), "
            f"{len(self.kept_float)} kept float{emb}{smooth}"
        )


def _calibration(model: nn.Module, tokenizer: Any, text: str | None, n_tokens: int) -> tuple[list[list[int]], str]:
    """Calibration windows (token ids, ``n_tokens`` of the text) and where their text came from."""
    from fxport.quant import smoothing

    source = "the given calibration text"
    if text is None:
        text, source = smoothing.calibration_text()
    inner = getattr(model, "model", model)
    window = min(512, getattr(inner, "max_seq_len", 512))  # the eager model's KV cache bounds a window
    return smoothing.calibration_windows(tokenizer, text, n_tokens=n_tokens, window=window), source


def _smooth(model: nn.Module, alpha: float | None, windows: list[list[int]], source: str):
    """Activation smoothing on the float model (``alpha`` None: none): its
    :class:`fxport.quant.smoothing.SmoothingReport` (or None) and ``{linear: (K,) max |input|}`` of
    the model as it is after (a smoothed linear's input channel j is divided by its scale s_j)."""
    from fxport.quant import smoothing

    amax = smoothing.input_absmax(model, windows)
    if alpha is None:
        return None, amax
    report = smoothing.smooth_activations(model, amax, alpha, source=source)
    after = dict(amax)
    for site, names in report.smoothed.items():
        if site in report.scales:
            for n in names:
                after[n] = amax[n] / report.scales[site]
    return report, after


def _split_outliers(model: nn.Module, amax: dict[str, Any], k: int) -> tuple[set[str], str]:
    """:func:`fxport.quant.outlier_split.split_outlier_channels`: the float linears' names and a summary."""
    from fxport.quant.outlier_split import FLOAT_LINEAR, MAX_SHARE, split_outlier_channels

    done = split_outlier_channels(model, amax, k)
    if not done:
        return set(), f"outlier split: none (no gated MLP with calibration statistics and >= {MAX_SHARE} channels)"
    sizes = "/".join(str(n) for n in sorted({int(c.numel()) for c in done.values()}))
    return ({f"{mlp}.{FLOAT_LINEAR}" for mlp in done},
            f"outlier split: {sizes} channel(s) of {len(done)} MLP(s) with a float32 down projection")


def _lookup_from_head(model: nn.Module, recipe: str, head_scale: Any = None) -> tuple[str, Any]:
    """Swap ``*embed_tokens`` for a lookup reading the int8 ``lm_head``'s codes; ``(fqn, lookup)``.

    ``head_scale``: the smoothing scale folded into the head's columns (the lookup divides by it)."""
    from fxport.quant.embedding import QuantizedEmbedding

    fqn = _embedding_fqn(model, recipe)
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"recipe {recipe!r} builds the embedding lookup from lm_head's codes but the model has no "
                         "nn.Linear lm_head")
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    emb = getattr(parent, child)
    scale = getattr(emb, "embed_scale", None)
    q = QuantizedEmbedding.from_int8_linear(head.weight, None if scale is None else float(scale),
                                            None if head_scale is None else 1.0 / head_scale)
    if (q.num_embeddings, q.embedding_dim) != tuple(emb.weight.shape):
        raise ValueError(f"recipe {recipe!r}: lm_head is {q.num_embeddings} x {q.embedding_dim} but {fqn} is "
                         f"{tuple(emb.weight.shape)}; the lookup can share the head's codes only when they are "
                         "the same table")
    setattr(parent, child, q)
    return fqn, q


def _embedding_fqn(model: nn.Module, recipe: str) -> str:
    fqn = next((n for n, m in model.named_modules() if n.endswith("embed_tokens") and isinstance(m, nn.Embedding)), None)
    if fqn is None:
        raise ValueError(f"recipe {recipe!r} quantizes the token embedding but the model has no "
                         "nn.Embedding named '*embed_tokens'")
    return fqn


def quantize_for_xnnpack(model: nn.Module, recipe: str | XnnpackRecipe, *, num_layers: int | None = None,
                         tokenizer: Any = None, calibration_text: str | None = None) -> QuantReport:
    """Quantize ``model``'s linears in place for XNNPACK with recipe ``recipe`` (a name, or an
    :class:`XnnpackRecipe` of your own).

    A recipe with ``smooth`` first folds activation-smoothing scales into the float model
    (:mod:`fxport.quant.smoothing`), calibrated on ``calibration_text`` (default: Python's
    documentation) encoded by ``tokenizer``; without a tokenizer the smoothing is skipped and
    the report says so.

    A linear whose weight is tied to an embedding takes the rule of that embedding's weight
    FQN when no rule names the linear itself. A recipe with an embedding rule swaps the
    module ``model.embed_tokens`` for a :class:`fxport.quant.embedding.QuantizedEmbedding`
    (after the head, which shares its weight, was quantized from the float table). A linear whose ``in_features`` is not a
    multiple of the group size stays float (reported in ``kept_float``).
    Raises ValueError for an unknown recipe (the message lists the valid names).
    """
    from torchao.quantization import quantize_

    if num_layers is None:
        cfg = getattr(model, "config", None)
        num_layers = getattr(cfg, "num_hidden_layers", None)
    pick = _resolver(recipe, num_layers)
    spec = recipe if isinstance(recipe, XnnpackRecipe) else XNNPACK_RECIPES.get(recipe)
    report = QuantReport(spec.name if spec is not None else recipe)
    windows, source = None, ""
    if spec is not None and (spec.smooth is not None or spec.gptq or spec.outlier_channels):
        if tokenizer is None:
            report.calibration = ("skipped: no tokenizer to encode the calibration text (no smoothing, no outlier "
                                  "split, no GPTQ)")
        else:
            windows, source = _calibration(model, tokenizer, calibration_text, spec.calibration_tokens)
            report.calibration = f"{sum(len(w) - 1 for w in windows)} tokens of {source}"
    shares = spec is not None and spec.lookup_from_head
    head_scale = None
    outlier_float: set[str] = set()
    if windows is not None and (spec.smooth is not None or spec.outlier_channels):
        smoothed, amax = _smooth(model, spec.smooth, windows, source)
        if smoothed is not None:
            report.smoothing = smoothed.summary()
            head_scale = next((s for site, s in smoothed.scales.items() if smoothed.smoothed[site] == ["lm_head"]), None)
        if spec.outlier_channels:
            outlier_float, report.outliers = _split_outliers(model, amax, spec.outlier_channels)
    tied: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)

    groups: dict[XnnpackWeightQuant, set[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        fqn = f"{name}.weight"
        if name in outlier_float:
            report.kept_float[name] = "the MLP's outlier channels (fxport.quant.outlier_split)"
            continue
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
    gptq_names = {n for q, names in groups.items() if q.bits == 4 for n in names} if windows and spec.gptq else set()
    if gptq_names:
        from fxport.quant.gptq import input_hessians

        hessians = input_hessians(model, windows, gptq_names)
        mods = dict(model.named_modules())
        float_weights = {n: mods[n].weight.detach().clone() for n in sorted(gptq_names)}
    for q, names in groups.items():
        quantize_(model, q.torchao_config(), filter_fn=lambda m, fqn, names=names: fqn in names)
    if gptq_names:
        from fxport.quant.gptq import apply_gptq

        done = apply_gptq(model, hessians, float_weights)
        report.gptq = f"GPTQ rounding for {len(done)} int4 linear(s)"
    emb_rule = spec.embedding if spec is not None else None
    if shares:
        fqn, q = _lookup_from_head(model, report.recipe, head_scale)
        unscale = ", divided by its smoothing scale" if head_scale is not None else ""
        report.embedding = f"{fqn} int8 per-row, lm_head's codes{unscale} ({q.nbytes() / 2**20:.1f} MiB, stored once)"
    elif emb_rule is not None:
        from fxport.quant.embedding import quantize_embedding

        fqn = _embedding_fqn(model, report.recipe)
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Linear) and head.weight is model.get_submodule(fqn).weight:
            raise ValueError(f"recipe {report.recipe!r}: the tied head must be quantized before its embedding "
                             "(give lm_head a rule)")
        q = quantize_embedding(model, fqn, *emb_rule)
        g = "per-row" if emb_rule[1] is None else f"g{emb_rule[1]}"
        report.embedding = f"{fqn} int{emb_rule[0]} {g} ({q.nbytes() / 2**20:.1f} MiB)"
    return report
