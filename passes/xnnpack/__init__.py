"""Rewrites that let XNNPACK take whole layers instead of fragments (CPU pipeline only).

XNNPACK's partitioner leaves some ops to ExecuTorch's portable kernels; every such op splits
the delegate, so a Gemma layer used to become ~10 small XNNPACK subgraphs with single-threaded
portable ops between them (slow to run, and slow to lower: each subgraph is compiled
separately). Each pass here rewrites one such pattern into ops XNNPACK lowers, with the same
numbers (one pass per module, each with its contract docstring):

* :class:`GeluTanhAsSigmoid` — tanh GELU as ``x * sigmoid(...)`` (XNNPACK's GELU is the erf form);
* :class:`AdditiveAttentionMask` — bool SDPA masks as one shared additive float mask;
* :class:`SDPAAsMatmul` — SDPA as matmul / softmax / matmul, GQA folded (no K/V copies);
* :class:`RMSNormAsLinear` — ``rms_norm``'s mean as a linear;
* :class:`SymbolicViewAsInferred` — a view's one symbolic size as ``-1``;
* :class:`RotateHalfAsLinear` — RoPE's ``rotate_half`` as a linear with a signed permutation;
* :class:`QKNormRopeAsOne` — a layer's query and key heads normalized and rotated as one tensor
  (after CustomSDPA: one norm and one RoPE instead of two, no transposes);
* :class:`CustomSDPA` — causal KV-cache attention as ExecuTorch's ``llama::custom_sdpa`` (in
  place, over the written prefix only: not an XNNPACK op, but it replaces the cache copies and
  the whole-cache attention XNNPACK would run).
"""

from __future__ import annotations

from fxport.passes.xnnpack.additive_attention_mask import AdditiveAttentionMask
from fxport.passes.xnnpack.custom_sdpa import CustomSDPA
from fxport.passes.xnnpack.gelu_tanh_as_sigmoid import GeluTanhAsSigmoid
from fxport.passes.xnnpack.qk_norm_rope_as_one import QKNormRopeAsOne
from fxport.passes.xnnpack.rms_norm_as_linear import RMSNormAsLinear
from fxport.passes.xnnpack.rotate_half_as_linear import RotateHalfAsLinear
from fxport.passes.xnnpack.sdpa_as_matmul import SDPAAsMatmul
from fxport.passes.xnnpack.symbolic_view_as_inferred import SymbolicViewAsInferred

#: the name GeluTanhAsSigmoid had before 2026-12-05, when it spelled the GELU with tanh
GeluTanhAsTanh = GeluTanhAsSigmoid

__all__ = ["AdditiveAttentionMask", "CustomSDPA", "GeluTanhAsSigmoid", "GeluTanhAsTanh", "QKNormRopeAsOne", "RMSNormAsLinear", "RotateHalfAsLinear", "SDPAAsMatmul", "SymbolicViewAsInferred"]
