"""``ClippableLinear``: the vision and audio towers' bias-free linear with optional clamps.

Gemma 4's encoders wrap some linears in input / output clamps whose bounds come from the
checkpoint (transformers' ``Gemma4ClippableLinear``; parameter names ``linear.weight`` and the
buffers ``input_min`` / ``input_max`` / ``output_min`` / ``output_max``). At init the bounds are
+-inf, so an unloaded layer is a plain linear.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ClippableLinear(nn.Module):
    """Bias-free linear between input and output clamps (buffers from the checkpoint; +-inf at init)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            for name, v in (("input_min", -math.inf), ("input_max", math.inf),
                            ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(v))

    def forward(self, x: Tensor) -> Tensor:
        # clamp(x, lo, hi) == minimum(maximum(x, lo), hi), spelled as binary ops XNNPACK delegates
        if self.clipped:
            x = torch.minimum(torch.maximum(x, self.input_min), self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.minimum(torch.maximum(x, self.output_min), self.output_max)
        return x
