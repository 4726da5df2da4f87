"""All fxport custom ops (``torch.ops.fxport.*``): importing this module registers them."""

from fxport.kernels import attention_ops  # noqa: F401

try:  # int4 ops are another engineer's module; attention ops must not depend on it
    from fxport.kernels import int4_ops  # noqa: F401
except ImportError:  # pragma: no cover - only while int4_ops.py is absent
    int4_ops = None
