"""Weight files read without any model: what ``models/`` and ``quant/`` both read.

* :mod:`fxport.weights.errors`: :class:`CheckpointError` (a weight file cannot be loaded; the
  message names the file or tensor and the fix) and its not-found subclass.
* :mod:`fxport.weights.gguf`: the GGUF reader (header, metadata, raw memory-mapped tensors,
  llama.cpp's Gemma tensor names mapped to transformers names). Nothing is dequantized here.

This package imports nothing of fxport outside itself, so ``models/gemma4/load.py`` (which turns
a file into a Gemma config and state dict) and ``quant/gguf_import.py`` (which repacks the raw
quantized blocks) both read through it and neither imports the other.
"""
