"""Int4Dispatch: one packed int4 weight, a different matmul per method.

Matches ``aten.linear(x, W, bias?)`` where W is
  (a) torchao's int4 weight-only dequant, as ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
      granularity=PerGroup(g))`` exports it:
      ``torchao.dequantize_affine(qdata, [1, g], scale, zero_point|None, torch.int8, -8, 7)``
      with qdata (N, K) int8, scale / zero_point (N, K // g) program inputs (parameters,
      buffers or constants), g even and dividing K; or
  (b) fxport's canonical form ``fxport.int4_dequant(packed, scales, zeros, g, dtype)`` (what
      :class:`fxport.quant.linear.QuantizedLinear` exports, and what this pass emits for
      prefill).
Produces, per call site, from M = prod(x.shape[:-1]) and the method:
  * decode (``method == "decode"`` or unknown method) with a static M <= ``decode_max_m``:
    ``fxport.int4_gemv(x, packed, scales, zeros, g)`` (+ ``add(bias)``), reading the packed
    weight directly;
  * otherwise (prefill, dynamic or large M): ``linear(x, fxport.int4_dequant(...), bias)``.
  For (a) the int8 qdata is replaced by new constants ``<module>.weight_packed`` (N, K // 2)
  uint8 (nibble-packed, codes + 8), ``<module>.weight_scales`` and ``<module>.weight_zeros``
  (zero_point + 8, in the scale dtype), ``<module>`` being the weight's module FQN; the int8
  inputs no longer read are removed. Prefill and decode therefore hold the same constant FQNs
  with identical tensors, so the weights are stored once.
Leaves alone: other dequant flavours (int8, per-axis embeddings, other quant ranges), dequants
  that feed anything but ``linear`` weights (skipped with the reason), non-constant qparams.
Meta-device programs (the CUDA dry run builds a 31B-shaped model without weights): matching
  needs shapes, dtypes and the op's arguments only. The one check that reads values, qdata in
  [-8, 7], cannot run on a meta tensor; it is then taken from the op's own quantization
  arguments (int8 storage, ``quant_min = -8``, ``quant_max = 7``, already required to match) and
  each such site is counted in ``stats.skipped[META_RANGE_UNCHECKED]`` (it is rewritten all the
  same). The packed constants are then meta tensors of the packed layout's shape and dtype, so a
  meta program and a real-valued one get the same graph.
Invariant: prefill rewrite is bit-identical to torchao's dequant (integer zeros); the GEMV
  equals it up to fp32 accumulation order. Idempotent: (b) in prefill form is left as is.
"""

from __future__ import annotations

import math
import re

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import fxport.kernels.int4_ops  # noqa: F401  (registers torch.ops.fxport.int4_*)
from fxport.passes.base import Pass, PassContext, PassResult, PassStats
from fxport.passes.graph import add_constant, arg, input_spec, remove_unused_inputs, tensor_of, val
from fxport.passes.match import is_op
from fxport.quant.packed import pack_int4

aten = torch.ops.aten
GEMV = torch.ops.fxport.int4_gemv.default
DEQUANT = torch.ops.fxport.int4_dequant.default
# stats.skipped key of a matched site whose qdata range check did not run (meta tensors: no values).
META_RANGE_UNCHECKED = "qdata range check not run on meta weights ([-8, 7] from quant_min/quant_max; site rewritten)"


def _torchao_dequant():
    try:
        return torch.ops.torchao.dequantize_affine.default
    except (AttributeError, RuntimeError):  # torchao not imported / not installed
        return None


def _bind(node: Node) -> dict:
    """Arguments of ``node`` by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def module_fqn(weight_target: str) -> str:
    """``"layers.0.mlp.up_proj.parametrizations.weight.original0"`` -> ``"layers.0.mlp.up_proj"``."""
    m = re.fullmatch(r"(.*)\.parametrizations\.weight\.original\d+", weight_target)
    if m:
        return m.group(1)
    for suffix in (".weight", ".qdata"):
        if weight_target.endswith(suffix):
            return weight_target[: -len(suffix)]
    return weight_target


def _packed(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (N, K) -> nibble-packed (N, K // 2) uint8 (:func:`pack_int4` of q + 8).
    A meta tensor (no values) gives a meta tensor of the same shape and dtype."""
    if q.is_meta:
        return torch.empty((q.shape[0], q.shape[1] // 2), dtype=torch.uint8, device="meta")
    return pack_int4(q.to(torch.int16) + 8)


def _static_m(x: Node) -> int | None:
    v = val(x)
    if v is None:
        return None
    dims = v.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


class Int4Dispatch(Pass):
    """See the module docstring. ``decode_max_m``: largest M sent to the GEMV;
    ``method`` overrides ``PassContext.method`` ("prefill" / "decode")."""

    def __init__(self, decode_max_m: int = 4, method: str | None = None):
        if method not in (None, "prefill", "decode"):
            raise ValueError(f"Int4Dispatch: method must be 'prefill', 'decode' or None, got {method!r}")
        self.decode_max_m = decode_max_m
        self.method = method

    def __repr__(self) -> str:
        return f"Int4Dispatch(decode_max_m={self.decode_max_m}, method={self.method!r})"

    # ------------------------------------------------------------------ matching

    def _match_torchao(self, ep: ExportedProgram, deq: Node) -> tuple[dict | None, str]:
        a = _bind(deq)
        qdata, scale, zero = a["input"], a["scale"], a["zero_point"]
        if a["input_dtype"] != torch.int8 or a.get("quant_min") != -8 or a.get("quant_max") != 7:
            return None, "dequantize_affine is not int4 (int8 storage, range [-8, 7])"
        for t in (qdata, scale) + ((zero,) if zero is not None else ()):
            if not isinstance(t, Node) or t.op != "placeholder" or tensor_of(ep, t) is None:
                return None, "qdata/scale/zero_point are not program constants"
        q = tensor_of(ep, qdata)
        s = tensor_of(ep, scale)
        if q.dim() != 2:
            return None, "qdata is not 2-D"
        n, k = q.shape
        block = list(a["block_size"])
        g = block[1] if len(block) == 2 else None
        if block[0] != 1 or g is None or g % 2 or k % g or s.numel() != n * (k // g):
            return None, f"block_size {block} is not per-group [1, g] with g even dividing K = {k}"
        meta = q.is_meta
        if not meta and q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
            return None, "qdata values outside [-8, 7]"
        scales = s.reshape(n, k // g).contiguous()
        if zero is None:
            zeros = torch.full_like(scales, 8)
        else:
            zeros = (tensor_of(ep, zero).reshape(n, k // g).to(scales.dtype) + 8).contiguous()
        base = module_fqn(input_spec(ep, qdata).target)
        return {
            "targets": (f"{base}.weight_packed", f"{base}.weight_scales", f"{base}.weight_zeros"),
            "tensors": (_packed(q), scales, zeros),
            "group_size": g,
            "dtype": a["output_dtype"],
            "weight": base,
            "range_checked": not meta,
        }, ""

    # ------------------------------------------------------------------ rewriting

    def _choose(self, m: int | None, method: str | None) -> tuple[str, str]:
        if method == "prefill":
            return "dequant", "method prefill"
        if m is None:
            return "dequant", "dynamic M"
        if m <= self.decode_max_m:
            return "gemv", f"M = {m} <= {self.decode_max_m}"
        return "dequant", f"M = {m} > {self.decode_max_m}"

    def run(self, ep: ExportedProgram, ctx: PassContext) -> PassResult:
        stats = PassStats()
        method = self.method or ctx.method
        graph = ep.graph
        torchao_deq = _torchao_dequant()
        changed = False
        for lin in list(graph.nodes):
            if not is_op(lin, aten.linear.default):
                continue
            x, w, bias = lin.args[0], lin.args[1], arg(lin, 2, "bias")
            if not isinstance(w, Node) or w.op != "call_function":
                continue
            if w.target == DEQUANT:
                packed, scales, zeros, g, dtype = w.args
                stats.matched += 1
                weight, form = getattr(packed, "name", "?"), "fxport"
            elif torchao_deq is not None and w.target == torchao_deq:
                info, why = self._match_torchao(ep, w)
                if info is None:
                    stats.skip(why)
                    continue
                if any(u.target != aten.linear.default or u.args[1] is not w for u in w.users):
                    stats.skip("dequantized weight has users other than linear weights")
                    continue
                stats.matched += 1
                if not info["range_checked"]:
                    stats.skip(META_RANGE_UNCHECKED)
                form, weight, g, dtype = "torchao", info["weight"], info["group_size"], info["dtype"]
            else:
                continue
            m = _static_m(x)
            choice, reason = self._choose(m, method)
            stats.sites.append({"node": lin.name, "weight": weight, "M": m, "choice": choice, "reason": reason, "from": form})
            if form == "torchao" and not info["range_checked"]:
                stats.sites[-1]["range_checked"] = False
            if form == "fxport" and choice == "dequant":
                continue  # already in prefill form
            if form == "torchao":
                packed, scales, zeros = (add_constant(ep, t, v) for t, v in zip(info["targets"], info["tensors"]))
            if choice == "gemv":
                with graph.inserting_before(lin):
                    out = graph.call_function(GEMV, (x, packed, scales, zeros, g))
                    if bias is not None:
                        out = graph.call_function(aten.add.Tensor, (out, bias))
                lin.replace_all_uses_with(out)
                graph.erase_node(lin)
            else:
                with graph.inserting_before(lin):
                    new_w = graph.call_function(DEQUANT, (packed, scales, zeros, g, dtype))
                lin.replace_input_with(w, new_w)
            if not w.users:
                graph.erase_node(w)
            stats.rewritten += 1
            changed = True
        if changed:
            graph.eliminate_dead_code()
            remove_unused_inputs(ep)
        return PassResult(ep, changed, stats)
