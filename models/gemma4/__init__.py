"""Gemma 4 / Gemma 3 text model: config presets, eager model, export of prefill/decode."""

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
