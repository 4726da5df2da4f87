"""Shape rules for torchao's affine quant ops while the build propagates fake tensors.

torchao defines ``torchao::choose_qparams_affine``, ``quantize_affine`` and ``dequantize_affine``
as CompositeImplicitAutograd custom ops: they have no shape function, so every time a graph is
re-traced under fake tensors (``run_decompositions`` in export, each ExecuTorch ExportPass, each
XNNPACK delegate's passes) the op runs its whole Python implementation on fake tensors (views,
min / max, divisions, rounding, clamps: ~20 ops, each with symbolic-shape arithmetic when L is
dynamic) to learn the shape and dtype of its outputs. The fake-tensor cache skips custom ops, so
this happens for every call: in the 270M balanced build (127 quantized linears, four of these
ops each) ~2,900 calls, ~20% of the build (cProfile).

:class:`quant_shape_rules` (a context manager around the build's graph stages) registers, over
torchao's kernels (once per process), kernels that inside the context answer a *pure fake
propagation* from the shapes alone: the outputs' shapes, dtypes and device are those torchao's
implementation gives (contiguous, as its ``view(...).to(...)`` ends give). Every other call goes
to torchao's implementation unchanged: real tensors (eager quantization and calibration), any
call while a tracer is recording (a proxy or functionalization mode on the stack: there the
implementation is what gets traced, e.g. a pattern graph that decomposes the op), inputs that
are not contiguous, and blocks larger than 1 along a symbolic dimension (where the
implementation's divisibility check would guard on the symbol), ``choose_qparams_affine`` with
all blocks of size 1 (torch.amin over no dimension reduces over all of them); and every call
outside the context.

The program written is byte-identical (``tests/builder/speedups/test_quant_shape_rules.py`` checks the
rules against torchao's implementation over recipes' shapes, ``tests/builder/test_speedups.py``
compares the bytes of a build with and without).

What it patches: the ``CompositeImplicitAutograd`` kernels of the three ops, registered when the
outermost context opens and removed when it closes (also on an exception), so outside a context
the dispatcher holds torchao's registration alone. :func:`probe` checks first that torchao is
the 0.18 series the rules restate (its output shapes and dtypes are implementation, not schema),
that the ops' schemas are the ones the kernels take, and that their Python implementations are
where this module falls back to.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from fxport.builder.speedups.probe import Mismatch, require, require_version

NAME = "quant_shape_rules"
_OPS = ("choose_qparams_affine", "quantize_affine", "dequantize_affine")
_SCHEMAS = {
    "choose_qparams_affine": "torchao::choose_qparams_affine(Tensor? input, str mapping_type, SymInt[] block_size, "
                             "ScalarType target_dtype, Scalar? quant_min=None, Scalar? quant_max=None, float? eps=None, "
                             "ScalarType? scale_dtype=None, ScalarType? zero_point_dtype=None, bool keepdim=False) "
                             "-> (Tensor, Tensor)",
    "quantize_affine": "torchao::quantize_affine(Tensor input, SymInt[] block_size, Tensor scale, Tensor? zero_point, "
                       "ScalarType output_dtype, Scalar? quant_min=None, Scalar? quant_max=None) -> Tensor",
    "dequantize_affine": "torchao::dequantize_affine(Tensor input, SymInt[] block_size, Tensor scale, "
                         "Tensor? zero_point, ScalarType input_dtype, Scalar? quant_min=None, Scalar? quant_max=None, "
                         "ScalarType output_dtype=6) -> Tensor",
}


def probe() -> None:
    """Raise :class:`fxport.builder.speedups.probe.Mismatch` unless torchao's ops are the ones
    the rules were checked against (see the module docstring)."""
    require_version("torchao", "0.18")
    require("torchao.quantization.quant_primitives:quantize_affine")  # defines the ops
    for name, schema in _SCHEMAS.items():
        op = getattr(getattr(torch.ops.torchao, name, None), "default", None)
        if op is None:
            raise Mismatch(f"torch.ops.torchao.{name} is missing")
        if str(op._schema) != schema:
            raise Mismatch(f"torch.ops.torchao.{name} has schema {op._schema}, expected {schema}")
        try:
            _original(name)
        except LookupError as exc:
            raise Mismatch(str(exc)) from None
    require("torch.fx.experimental.proxy_tensor:get_proxy_mode")
    require("torch._C:_TorchDispatchModeKey.FUNCTIONAL")
    require("torch._prims_common:is_contiguous_or_false")
    require("torch._subclasses.fake_tensor:FakeTensor")


def registered() -> bool:
    """Whether the shape-rule kernels are registered now (only while a context is open)."""
    return _state["library"] is not None
# torchao's uintx dtypes (torch.uint1 ... uint7) quantize into uint8 storage
_SUB_BYTE_UINTS = tuple(getattr(torch, f"uint{b}") for b in range(1, 8) if hasattr(torch, f"uint{b}"))


def _original(name: str) -> Callable:
    """torchao's Python implementation of ``torchao::name`` (what its CIA kernel runs)."""
    from torch._inductor.decomposition import decompositions

    op = getattr(torch.ops.torchao, name).default
    if op not in decompositions:
        raise LookupError(f"torchao::{name} has no registered implementation to fall back to")
    return decompositions[op]


def _recording() -> bool:
    """Whether a tracer is recording the ops run now (then the implementation must run)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    functional = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL)
    return get_proxy_mode() is not None or functional is not None


def _fake_only(t: Any) -> bool:
    """Inside a context, a fake tensor, contiguous without a guard, outside any tracer: a shape
    question only."""
    from torch._prims_common import is_contiguous_or_false
    from torch._subclasses.fake_tensor import FakeTensor

    return (_state["active"] > 0 and isinstance(t, FakeTensor) and is_contiguous_or_false(t)
            and not _recording())


def _blocks_static(block_size: list[int], shape: Any) -> bool:
    """Blocks > 1 only along dimensions of known size (the implementation checks divisibility)."""
    return len(block_size) == len(shape) and all(
        b == 1 or (isinstance(n, int) and n % b == 0) for b, n in zip(block_size, shape))


def _reduced_shape(block_size: list[int], shape: Any, keepdim: bool) -> list:
    """Shape of the qparams torchao's ``_choose_qparams_affine`` returns for ``shape``."""
    if keepdim:
        return [n // b for n, b in zip(shape, block_size)]
    out = []
    for b, n in zip(block_size, shape):
        if b == 1:
            out.append(n)  # one qparam per element along this dimension
        elif b != n:
            out.append(n // b)  # (n / b, b): the block dimension is reduced away
        # b == n > 1: the whole dimension is one block, reduced away
    return out


def _choose_qparams_affine(original: Callable) -> Callable:
    def kernel(input, mapping_type, block_size, target_dtype, quant_min=None, quant_max=None, eps=None,
               scale_dtype=None, zero_point_dtype=None, keepdim=False):
        # all blocks 1: torchao reduces over no dimension, which torch.amin reads as all of them
        if not (_fake_only(input) and _blocks_static(block_size, input.shape) and max(block_size, default=1) > 1):
            return original(input, mapping_type, block_size, target_dtype, quant_min, quant_max, eps,
                            scale_dtype, zero_point_dtype, keepdim)
        shape = _reduced_shape(block_size, input.shape, keepdim)
        scale = input.new_empty(shape, dtype=scale_dtype or input.dtype)
        if zero_point_dtype is None:  # torchao: int32 for asymmetric, the input's float otherwise
            zero_point_dtype = torch.int32 if mapping_type == "ASYMMETRIC" else input.dtype
        return scale, input.new_empty(shape, dtype=zero_point_dtype)

    return kernel


def _quantize_affine(original: Callable) -> Callable:
    def kernel(input, block_size, scale, zero_point, output_dtype, quant_min=None, quant_max=None):
        if not (_fake_only(input) and _blocks_static(block_size, input.shape)):
            return original(input, block_size, scale, zero_point, output_dtype, quant_min, quant_max)
        dtype = torch.uint8 if output_dtype in _SUB_BYTE_UINTS else output_dtype
        return input.new_empty(input.shape, dtype=dtype)

    return kernel


def _dequantize_affine(original: Callable) -> Callable:
    def kernel(input, block_size, scale, zero_point, input_dtype, quant_min=None, quant_max=None,
               output_dtype=torch.float32):
        if not (_fake_only(input) and _blocks_static(block_size, input.shape)):
            return original(input, block_size, scale, zero_point, input_dtype, quant_min, quant_max, output_dtype)
        return input.new_empty(input.shape, dtype=output_dtype)

    return kernel


_RULES = {"choose_qparams_affine": _choose_qparams_affine, "quantize_affine": _quantize_affine,
          "dequantize_affine": _dequantize_affine}


_state = {"active": 0, "library": None}  # open contexts; the Library holding the kernels while one is


def _register(kernels: dict[str, Callable]) -> Any:
    """A Library with ``kernels`` as the ops' CompositeImplicitAutograd kernels (over torchao's)."""
    lib = torch.library.Library("torchao", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
        for name, kernel in kernels.items():
            lib.impl(name, kernel, "CompositeImplicitAutograd")
    return lib


def _install() -> None:
    """Register the kernels over torchao's (the outermost context opening)."""
    import torchao.quantization.quant_primitives  # noqa: F401  (defines the ops)

    _state["library"] = _register({name: _RULES[name](_original(name)) for name in _OPS})


def _uninstall() -> None:
    """Remove the kernels (the outermost context closing): the dispatcher's table is torchao's
    again. torch 2.13 also keeps, per op and key, the last Python kernel registered, which it
    calls while a dispatch mode (a fake mode) is active, and removing a registration leaves that
    entry pointing at the removed kernel: registering torchao's own implementation once more and
    removing it at once puts the entry back to torchao's (what it was before the context)."""
    lib, _state["library"] = _state["library"], None
    lib._destroy()
    _register({name: _original(name) for name in _OPS})._destroy()


class quant_shape_rules:
    """Context manager: torchao's affine quant ops answer fake propagation from shapes (see the
    module docstring). Nested contexts share one registration (made by the outermost)."""

    def __enter__(self) -> "quant_shape_rules":
        if _state["active"] == 0:
            _install()
        _state["active"] += 1
        return self

    def __exit__(self, *exc) -> None:
        _state["active"] -= 1
        if _state["active"] == 0:
            _uninstall()
