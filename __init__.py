"""fxport: graph-rewrite passes that turn eager PyTorch LLMs into fast ExecuTorch programs."""

__version__ = "0.1.0"
