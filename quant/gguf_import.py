"""GGUF block-quantized weights (Q4_K, Q6_K, Q8_0) -> canonical :class:`QuantizedWeight`.

Native conversions (no requantization; checked against ``gguf.quants.dequantize``):

* ``Q8_0`` (blocks of 32: fp16 ``d``, 32 int8 ``q``; ``w = d * q``) -> 8-bit, group 32,
  codes ``q + 128``, zeros 128, scales ``d``. Bit-exact.
* ``Q6_K`` (super-blocks of 256: 16 groups of 16 with int8 scales ``sc``; ``w = d * sc * q``,
  ``q`` in [-32, 31]) -> 8-bit, group 16, codes ``q + 32``, zeros 32, scales ``d * sc``
  (exact in fp32). Bit-exact.
* ``Q4_K`` (super-blocks of 256: 8 groups of 32 with 6-bit scale ``sc`` and min ``m``;
  ``w = d * sc * q - dmin * m``, ``q`` in [0, 15]) -> 4-bit, group 32, scales ``d * sc``,
  zeros ``dmin * m / (d * sc)`` (fractional). Exact up to fp32 rounding of the zero (a few
  ulps of the group's range); a group with ``sc == 0`` is the constant ``-dmin * m``, stored as
  codes 0 with zero 1 and scale ``dmin * m`` (exact).

When the wanted :class:`~fxport.quant.recipe.QuantConfig` differs from the native form (e.g.
int4 g32 for a Q6_K or Q8_0 tensor), the weight is dequantized with the gguf package and
requantized; every conversion returns an :class:`ImportReport` with the error against
``gguf.quants.dequantize``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from fxport.quant.packed import QuantFormatError, QuantizedWeight, pack_int4
from fxport.quant.quantize import quantize_weight
from fxport.quant.recipe import QuantConfig, QuantRecipe
from fxport.weights.gguf import iter_gguf_tensors

QK_K = 256
NATIVE = {"Q4_K": (4, 32), "Q6_K": (8, 16), "Q8_0": (8, 32)}


@dataclass
class ImportReport:
    name: str
    ggml_type: str
    shape: tuple[int, int]
    mode: str  # "exact" | "exact up to fp32 rounding" | "requantized to <config>"
    max_abs_err: float
    mean_abs_err: float

    def __str__(self) -> str:
        return (
            f"{self.name:<48} {self.ggml_type:<5} {str(self.shape):<14} {self.mode:<34} "
            f"max|diff| {self.max_abs_err:.3e}  mean|diff| {self.mean_abs_err:.3e}"
        )


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray, n: int, k: int) -> QuantizedWeight:
    d = _f16(blocks[:, :2])  # (nb, 1)
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.int16)  # (nb, 32)
    codes = torch.from_numpy((q + 128).astype(np.uint8)).reshape(n, k)
    scales = torch.from_numpy(d).reshape(n, k // 32)
    return QuantizedWeight(codes, scales, torch.full_like(scales, 128.0), 32, 8, (n, k))


def _q6_k(blocks: np.ndarray, n: int, k: int) -> QuantizedWeight:
    nb = blocks.shape[0]
    ql, qh = blocks[:, : QK_K // 2], blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    sc = np.ascontiguousarray(blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]).view(np.int8)
    d = _f16(blocks[:, -2:])  # (nb, 1)
    # Element order within a super-block (ggml's dequantize_row_q6_K): two halves of 128; in a
    # half, ql low nibbles give elements 0..63, high nibbles 64..127; qh 2-bit fields in
    # groups of 32 (shifts 0, 2, 4, 6).
    lo = ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    lo = (lo & 0x0F).reshape(nb, 2, 4, 32)
    hi = qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(nb, 2, 4, 32)
    codes = (lo | (hi << 4)).reshape(n, k)  # q + 32, in [0, 63]
    scales = (d * sc.astype(np.float32)).reshape(n, k // 16)
    scales_t = torch.from_numpy(np.ascontiguousarray(scales))
    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(codes)), scales_t, torch.full_like(scales_t, 32.0), 16, 8, (n, k))


def _q4_k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of 8 (6-bit scale, 6-bit min) pairs -> two (nb, 8) arrays."""
    s = s.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(blocks: np.ndarray, n: int, k: int) -> QuantizedWeight:
    nb = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # (nb, 1)
    sc, mn = _q4_k_scale_min(np.ascontiguousarray(blocks[:, 4:16]))  # (nb, 8)
    qs = blocks[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(nb, 8, 32)  # 4 chunks of 32 bytes: low nibbles then high nibbles
    scale = d * sc.astype(np.float32)  # (nb, 8) exact: fp16 x 6-bit int
    dm = dmin * mn.astype(np.float32)  # (nb, 8)
    dead = scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(dead, 1.0, dm / np.where(dead, 1.0, scale)).astype(np.float32)
    scale = np.where(dead, dm, scale).astype(np.float32)
    codes = np.where(dead[..., None], 0, codes).astype(np.uint8)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k)))
    return QuantizedWeight(
        pack_int4(codes_t),
        torch.from_numpy(np.ascontiguousarray(scale.reshape(n, k // 32))),
        torch.from_numpy(np.ascontiguousarray(zero.reshape(n, k // 32))),
        32, 4, (n, k),
    )


_NATIVE_FN = {"Q4_K": _q4_k, "Q6_K": _q6_k, "Q8_0": _q8_0}


def import_tensor(
    name: str, ggml_type, shape: tuple[int, ...], data: np.ndarray, config: QuantConfig | None = None
) -> tuple[QuantizedWeight, ImportReport]:
    """One GGUF tensor (raw block bytes, PyTorch-order (N, K) shape) -> canonical + report.

    ``config=None`` keeps the native form; a config whose bits/group differ from the native
    ones requantizes the gguf-dequantized weight with ``config``.
    """
    from gguf.quants import dequantize

    tname = getattr(ggml_type, "name", str(ggml_type))
    if tname not in NATIVE and config is None:
        raise QuantFormatError(
            f"{name}: GGUF type {tname} has no native canonical form (those: {sorted(NATIVE)}); "
            "pass a QuantConfig to requantize it"
        )
    if len(shape) != 2 or (tname in NATIVE and shape[1] % (QK_K if tname != "Q8_0" else 32)):
        raise QuantFormatError(f"{name}: expected a 2-D weight with whole {tname} blocks per row, got shape {shape}")
    n, k = int(shape[0]), int(shape[1])
    ref = torch.from_numpy(np.ascontiguousarray(dequantize(data, ggml_type)).reshape(n, k)).float()
    bits, group = NATIVE.get(tname, (None, None))
    if tname in NATIVE and (config is None or (config.bits, config.group_size) == (bits, group)):
        blocks = np.ascontiguousarray(data).reshape(-1, data.size // (n * k // (QK_K if tname != "Q8_0" else 32)))
        qw = _NATIVE_FN[tname](blocks, n, k)
        err = (qw.dequantize(torch.float32) - ref).abs()
        mode = "exact" if float(err.max()) == 0.0 else "exact up to fp32 rounding"
    else:
        qw = quantize_weight(ref, config)
        err = (qw.dequantize(torch.float32) - ref).abs()
        mode = f"requantized to {config}"
    return qw, ImportReport(name, tname, (n, k), mode, float(err.max()), float(err.mean()))


def import_gguf(
    path: str | os.PathLike, recipe: QuantRecipe | None = None, names: Iterable[str] | None = None
) -> tuple[dict[str, QuantizedWeight], list[ImportReport]]:
    """2-D GGUF tensors -> ``{transformers name: weight}``.

    Without a recipe: every Q4_K / Q6_K / Q8_0 tensor in its native form. With a recipe: every
    tensor the recipe selects (a Q4_K/Q6_K/Q8_0 one whose config matches its native form is
    converted exactly; any other, e.g. Q5_0 or F16, is requantized); the rest is skipped. ``names`` restricts the import to those transformers
    names. Other tensors (norms, F32/F16) are left to ``fxport.models.gemma4.load.load_gguf``.
    """
    wanted = None if names is None else set(names)
    num_layers = None
    weights, reports = {}, []
    tensors = list(iter_gguf_tensors(path))
    if recipe is not None:
        layers = [int(t.hf_name.split(".")[2]) for t in tensors if t.hf_name and t.hf_name.startswith("model.layers.")]
        num_layers = max(layers) + 1 if layers else None
    for t in tensors:
        tname = getattr(t.ggml_type, "name", "")
        if t.hf_name is None or len(t.shape) != 2 or (recipe is None and tname not in NATIVE):
            continue
        if wanted is not None and t.hf_name not in wanted:
            continue
        config = None
        if recipe is not None:
            config = recipe.config_for(t.hf_name, num_layers)
            if config is None:
                continue
        qw, rep = import_tensor(t.hf_name, t.ggml_type, t.shape, t.data, config)
        weights[t.hf_name] = qw
        reports.append(rep)
    return weights, reports
