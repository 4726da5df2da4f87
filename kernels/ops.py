"""All fxport custom ops (``torch.ops.fxport.*``): importing this module registers them.

Neither op module imports torchao or executorch, nor the Triton kernel modules: those load
when a CUDA tensor (or a trace for AOTInductor) reaches an op. (``torch.library.triton_op``
itself imports triton, so set ``TRITON_INTERPRET`` before importing this module.)
"""

from fxport.kernels import attention_ops  # noqa: F401
from fxport.kernels import int4_ops  # noqa: F401
