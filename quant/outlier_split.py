"""Outlier channels of an MLP's down projection computed in float32, the rest int8.

On the ``balanced`` recipe (every linear int8 per channel with int8 per-token dynamic
activations, XNNPACK's ``qd8-f32-qc8w``) the activation rounding of ``down_proj``'s input, the
2048-wide ``act(gate(x)) * up(x)``, is half of the whole quantization error: keeping only the
18 ``down_proj`` float in eager takes the mean KL to the fp32 reference from 0.0114 to 0.0055
on bench/quality.py's texts (gate/up float: 0.0101, q/k/v: 0.0105, o: 0.0104). A few of those
2048 channels carry activations 5-10x the median channel's even after smoothing (Gemma 3 270M
layer 0: 5.3 against a median of 0.58), and one per-token scale has to cover them, so every
other channel is rounded coarsely (LLM.int8()'s observation, Dettmers et al. 2022).

:class:`OutlierSplitMLP` computes the ``k`` channels with the largest calibration absmax on a
branch of their own, ``down_outliers(act(gate_outliers(x)) * up_outliers(x))`` with
``down_outliers`` (H, k) kept float32, and adds it to the remaining channels' ``down_proj``:

    x (.., H) -> gate_proj, up_proj (I - k rows)  -> act * -> down_proj (H, I - k)     int8 ----+
              -> gate_outliers, up_outliers (k rows) -> act * -> down_outliers (H, k) float32 --+-> (.., H)

No slice of an activation is taken (XNNPACK takes no ``slice`` on a tensor with a dynamic
length, so a slice would split the delegate): the intermediate channels are split by the rows
of ``gate_proj`` / ``up_proj`` and the columns of ``down_proj``. Per-output-channel (or row-wise
group) weight quantization quantizes each gate / up row on its own, so both branches' gate / up
codes are the rows the unsplit linear would have had; only ``down_proj``'s input rounding
changes. Bytes per token: the ``k`` columns of ``down_proj`` move from int8 to float32 (k = 64:
+123 KB a layer, +0.8% of the 270M's 270 MB).

Measured on Gemma 3 270M (eager, bench/quality.py texts, llama.cpp 10.84 / 11.55, fp32 10.87 /
11.49), ``balanced`` without and with the split:

=========  ==============  ========  =============
k          ppl A / B       mean KL   top-1 agree
=========  ==============  ========  =============
0          10.99 / 11.56   0.0114    94.2%
8          10.89 / 11.53   0.0089    94.9%
32         10.94 / 11.57   0.0087    95.3%
64         10.91 / 11.55   0.0078    96.0%
=========  ==============  ========  =============

(k = 32 with the outlier ``down`` int8 on its own activation scale: 0.0090; a larger smoothing
alpha for ``down_proj`` instead made it worse: 0.7 -> 0.0123, 0.85 -> 0.0174.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

#: the outlier branch's down projection inside :class:`OutlierSplitMLP`: the linear a recipe keeps float
FLOAT_LINEAR = "down_outliers"
#: an MLP gives at most 1 / MAX_SHARE of its intermediate channels to the outlier branch
MAX_SHARE = 8


def _linear_of(weight: Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    lin.weight.copy_(weight)
    return lin


class OutlierSplitMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the intermediate channels ``outliers`` (k,) on their own
    branch: ``gate_proj`` / ``up_proj`` / ``down_proj`` hold the other I - k channels (names kept, so
    recipe rules naming them still match), ``gate_outliers`` / ``up_outliers`` / ``down_outliers``
    the k outliers. Equal to the unsplit MLP up to float32 summation order."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: Callable[[Tensor], Tensor],
                 outliers: Tensor):
        super().__init__()
        inter = down.in_features
        if gate.out_features != inter or up.out_features != inter:
            raise ValueError(f"OutlierSplitMLP: gate / up give {gate.out_features} / {up.out_features} channels but "
                             f"down_proj takes {inter}")
        if gate.bias is not None or up.bias is not None or down.bias is not None:
            raise ValueError("OutlierSplitMLP: gate / up / down with a bias are not supported")
        keep = torch.ones(inter, dtype=torch.bool)
        keep[outliers] = False
        if not 0 < int(outliers.numel()) < inter or int(keep.sum()) != inter - outliers.numel():
            raise ValueError(f"OutlierSplitMLP: outliers must be 1 to {inter - 1} distinct channels of {inter}, "
                             f"got {outliers.numel()}")
        rest = keep.nonzero().flatten()
        w_gate, w_up, w_down = gate.weight.detach(), up.weight.detach(), down.weight.detach()
        self.gate_proj, self.up_proj = _linear_of(w_gate[rest]), _linear_of(w_up[rest])       # (I - k, H)
        self.down_proj = _linear_of(w_down[:, rest])                                           # (H, I - k)
        self.gate_outliers, self.up_outliers = _linear_of(w_gate[outliers]), _linear_of(w_up[outliers])  # (k, H)
        self.down_outliers = _linear_of(w_down[:, outliers])                                   # (H, k)
        self.act = act
        # for reports and tests; a plain attribute, not a buffer: torch.export would lift a buffer
        # into every program as an input the graph never reads
        self.outliers = outliers.clone()

    def forward(self, x: Tensor) -> Tensor:
        rest = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return rest + self.down_outliers(self.act(self.gate_outliers(x)) * self.up_outliers(x))


def is_gated_mlp(mlp: nn.Module | None) -> bool:
    """fxport's gated MLP layout: ``gate_proj`` / ``up_proj`` / ``down_proj`` linears and ``act``."""
    return (mlp is not None and not isinstance(mlp, OutlierSplitMLP) and callable(getattr(mlp, "act", None))
            and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


def split_outlier_channels(model: nn.Module, down_absmax: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Replace each decoder layer's gated MLP (``model[.model].layers[i].mlp``) by an
    :class:`OutlierSplitMLP` of its ``k`` intermediate channels with the largest
    ``down_absmax[f"{prefix}layers.{i}.mlp.down_proj"]`` (the (I,) max |input| of ``down_proj`` on
    calibration text, of the model as it is now: after smoothing); at most ``I // MAX_SHARE`` of an
    MLP's channels (a small model's MLP keeps most of its int8 bytes), none when that is 0. Layers
    without statistics or without a gated MLP are left alone. Returns ``{mlp FQN: outlier
    channels}`` of the layers split.
    """
    if k <= 0:
        raise ValueError(f"split_outlier_channels: k must be positive, got {k}")
    inner = getattr(model, "model", model)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is inner and n), "")
    done: dict[str, Tensor] = {}
    for i, layer in enumerate(getattr(inner, "layers", [])):
        mlp = getattr(layer, "mlp", None)
        name = f"{prefix}layers.{i}.mlp"
        amax = down_absmax.get(f"{name}.down_proj")
        if not is_gated_mlp(mlp) or amax is None:
            continue
        if amax.numel() != mlp.down_proj.in_features:
            raise ValueError(f"split_outlier_channels: {name}.down_proj takes {mlp.down_proj.in_features} channels "
                             f"but its calibration absmax has {amax.numel()}")
        n = min(k, amax.numel() // MAX_SHARE)
        if n == 0:
            continue
        outliers = torch.topk(amax.float(), n).indices.sort().values
        layer.mlp = OutlierSplitMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act, outliers)
        done[name] = outliers
    return done


__all__ = ["FLOAT_LINEAR", "MAX_SHARE", "OutlierSplitMLP", "is_gated_mlp", "split_outlier_channels"]
