"""Quantizers producing the canonical form (:class:`fxport.quant.packed.QuantizedWeight`).

* ``"minmax"``: torchao's ``choose_qparams_affine`` + ``quantize_affine`` per group along K,
  asymmetric (codes ``[0, 2**bits - 1]``, integer zero) or symmetric (signed codes shifted by
  ``2**(bits-1)``, so zeros are exactly ``2**(bits-1)``).
* ``"hqq"``: torchao's Half-Quadratic Quantization (``_choose_qparams_and_quantize_affine_hqq``,
  proximal optimisation of scale/zero), asymmetric with fractional zeros.

torchao is imported on first use only. :func:`quantize_model` walks a model with a
:class:`~fxport.quant.recipe.QuantRecipe` and returns ``{weight FQN: QuantizedWeight}``;
:func:`dequantize_into` writes the dequantized weights back (fake quantization, used by the
quality report); :func:`fxport.quant.linear.to_quantized_linears` swaps in packed modules for
export.
"""

from __future__ import annotations

import torch
from torch import nn

from fxport.quant.packed import QuantFormatError, QuantizedWeight, pack_int4
from fxport.quant.recipe import QuantConfig, QuantRecipe

METHODS = ("minmax", "hqq")


def _group_size(weight: torch.Tensor, group_size: int | None) -> int:
    k = weight.shape[-1]
    g = k if group_size is None else group_size
    if g <= 0 or k % g:
        raise QuantFormatError(
            f"quantize_weight: group_size {group_size} does not divide in_features {k}; "
            "pick a divisor or group_size=None (per channel)"
        )
    return g


def _make(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int, bits: int, scale_dtype) -> QuantizedWeight:
    n, k = codes.shape
    scales = scales.reshape(n, k // g).to(scale_dtype)
    zeros = zeros.reshape(n, k // g).to(scale_dtype)
    packed = pack_int4(codes) if bits == 4 else codes.to(torch.uint8)
    return QuantizedWeight(packed, scales, zeros, g, bits, (n, k))


def quantize_minmax(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Min-max (affine) quantization of an (N, K) weight, one scale/zero per group of K."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    if weight.dim() != 2:
        raise QuantFormatError(f"quantize_minmax: expected a 2-D (N, K) weight, got shape {tuple(weight.shape)}")
    g = _group_size(weight, group_size)
    w = weight.detach().float()
    block = (1, g)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale, zp = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax)
        q = quantize_affine(w, block, scale, zp, torch.int8, qmin, qmax)
        codes = q.to(torch.int16) + 2 ** (bits - 1)
        zeros = zp.to(torch.float32) + 2 ** (bits - 1)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale, zp = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.uint8, qmin, qmax)
        codes = quantize_affine(w, block, scale, zp, torch.uint8, qmin, qmax)
        zeros = zp.to(torch.float32)
    return _make(codes, scale, zeros, g, bits, scale_dtype)


def quantize_hqq(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 32,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """HQQ quantization (torchao) of an (N, K) weight: asymmetric, fractional zeros."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    if weight.dim() != 2:
        raise QuantFormatError(f"quantize_hqq: expected a 2-D (N, K) weight, got shape {tuple(weight.shape)}")
    g = _group_size(weight, group_size)
    codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        weight.detach().float(),
        nbits=bits,
        group_size=g,
        axis=1,
        compute_dtype=torch.float32,
        device=str(weight.device),
        raw_output=True,
    )
    return _make(codes, scale, zero, g, bits, scale_dtype)


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Quantize one (N, K) weight as ``config`` says (bits, group size, method, symmetry)."""
    if config.method == "minmax":
        return quantize_minmax(weight, config.bits, config.group_size, config.symmetric)
    if config.method == "hqq":
        if config.symmetric:
            raise QuantFormatError("quantize_weight: HQQ is asymmetric; use symmetric=False or method='minmax'")
        return quantize_hqq(weight, config.bits, config.group_size)
    raise QuantFormatError(f"quantize_weight: unknown method {config.method!r}; expected one of {METHODS}")


def quantizable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight FQN: module}`` for every nn.Linear / nn.Embedding weight (shared ones once)."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            out[f"{name}.weight" if name else "weight"] = mod
    return out


def quantize_model(model: nn.Module, recipe: QuantRecipe, num_layers: int | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every Linear/Embedding weight the recipe selects -> ``{weight FQN: QuantizedWeight}``.

    ``num_layers`` resolves negative layer filters (e.g. "the last two layers"); by default it
    is read from ``model.config.num_hidden_layers`` when present.
    """
    if num_layers is None:
        cfg = getattr(model, "config", None)
        num_layers = getattr(cfg, "num_hidden_layers", None)
    out: dict[str, QuantizedWeight] = {}
    for fqn, mod in quantizable_weights(model).items():
        config = recipe.config_for(fqn, num_layers)
        if config is not None:
            out[fqn] = quantize_weight(mod.weight, config)
    return out


@torch.no_grad()
def dequantize_into(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Overwrite each named weight of ``model`` by its dequantized value (fake quantization)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, qw in weights.items():
        if fqn not in params:
            raise KeyError(f"dequantize_into: model has no parameter {fqn!r}")
        p = params[fqn]
        p.copy_(qw.dequantize(torch.float32).to(p.dtype).reshape(p.shape))
