"""fxport.quant: recipes, quantizers, the canonical packed int4/int8 format, GGUF import and
the quality report.

    recipe = get_recipe("default")                 # or "sensitive"; print(recipe)
    qweights = quantize_model(model, recipe)       # {weight FQN: QuantizedWeight}
    save_quantized("w.safetensors", qweights)      # versioned safetensors
    to_quantized_linears(model, qweights)          # int4 linears -> QuantizedLinear (export)
    dequantize_into(model, qweights)               # or: fake-quantize in place (quality report)

torchao and gguf are imported on first use only.
"""

from fxport.quant.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QuantFormatError,
    QuantizedWeight,
    dequantize_codes,
    load_quantized,
    pack_int4,
    save_quantized,
    unpack_int4,
)
from fxport.quant.quantize import dequantize_into, quantize_hqq, quantize_minmax, quantize_model, quantize_weight
from fxport.quant.recipe import DEFAULT_RECIPE, RECIPES, SENSITIVE_RECIPE, QuantConfig, QuantRecipe, QuantRule, get_recipe
from fxport.quant.report import QualityReport, mean_abs_diff, peir, quality_report


def __getattr__(name):  # QuantizedLinear pulls in the torch.library ops; import it lazily
    if name in ("QuantizedLinear", "to_quantized_linears"):
        from fxport.quant import linear

        return getattr(linear, name)
    if name in ("import_gguf", "import_tensor", "ImportReport"):
        from fxport.quant import gguf_import

        return getattr(gguf_import, name)
    raise AttributeError(f"module 'fxport.quant' has no attribute {name!r}")


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "QuantFormatError", "QuantizedWeight", "dequantize_codes", "load_quantized",
    "pack_int4", "save_quantized", "unpack_int4", "dequantize_into", "quantize_hqq", "quantize_minmax",
    "quantize_model", "quantize_weight", "DEFAULT_RECIPE", "RECIPES", "SENSITIVE_RECIPE", "QuantConfig",
    "QuantRecipe", "QuantRule", "get_recipe", "QualityReport", "mean_abs_diff", "peir", "quality_report",
    "QuantizedLinear", "to_quantized_linears", "import_gguf", "import_tensor", "ImportReport",
]
