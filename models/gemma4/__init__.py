"""Gemma 4 / Gemma 3: config presets, the eager text model, vision and audio towers, export of
their methods. Only the model: nothing here imports ``fxport.passes`` or ``fxport.lowering``
(``tests/test_layers.py`` checks it); every optimization is a pass.

Stated exceptions, spellings chosen in the model because a backend takes them and a pass could
not prove the rewrite safe from the graph alone (each is the same math as transformers' form,
tested against it):

* ``ClippableLinear``'s clamps are ``minimum(maximum(x, lo), hi)``: the bounds are checkpoint
  buffers (tensors), and XNNPACK's clamp takes scalar bounds only; a pass would need the bounds
  as numbers, which the graph does not hold (they are weights, loaded with the checkpoint).
* The audio tower's chunked attention builds its query blocks and key windows with slices and
  one ``cat`` and multiplies with 3-D ``bmm`` (transformers uses ``unfold`` and 4-D matmuls,
  which XNNPACK does not take); the shapes are static per block, so the slices are exact.
"""

from .config import PRESETS, Gemma4Config, from_hf_config, get_preset
from .model import Gemma4ForCausalLM, cache_buffers, sliding_window_buffers

__all__ = [
    "PRESETS",
    "Gemma4Config",
    "Gemma4ForCausalLM",
    "cache_buffers",
    "from_hf_config",
    "get_preset",
    "sliding_window_buffers",
]
