"""Activation smoothing (SmoothQuant, Xiao et al. 2022) folded into the weights before int8
dynamic-activation quantization.

XNNPACK's int8 linears quantize each activation row (token) with one scale: a few input
channels with large magnitudes (outlier channels, the same ones at every token) set that scale
and crush every other channel to a handful of levels. Measured on Gemma 3 270M (bench/quality.py
texts, eager): int8 per-channel weights alone cost mean KL 0.005 to the fp32 reference (what
llama.cpp's Q4_K_M costs), int8 per-token activations alone 0.018 (0.008 of it at ``down_proj``).

Smoothing moves that range from the activations into the weights, exactly in float: for a
linear ``y = x W^T`` with input channel ``j`` scaled by ``1 / s_j`` and weight column ``j`` by
``s_j``, ``y`` is unchanged. ``1 / s`` is folded into whatever produces ``x``, so no op is
added to the program:

* an RMSNorm feeding only these linears: its scale ``g`` becomes ``g / s``
  (``input_layernorm`` -> q/k/v_proj, ``pre_feedforward_layernorm`` -> gate/up_proj, the final
  ``norm`` -> ``lm_head``, untied from the embedding first so the lookup keeps its table);
* ``up_proj``'s output rows for ``down_proj`` (``down(act(gate(x)) * up(x))``: scaling up's row
  ``j`` scales input channel ``j`` of down);
* ``v_proj``'s output rows for ``o_proj`` (attention is linear in V; one scale per KV-head
  channel, shared by the query heads reading that KV head), only when no normalization follows
  V (Gemma 4's ``v_norm`` would undo it), V has its own projection and no other layer reads
  this layer's V cache (KV sharing).

``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` with ``max|x_j|`` over a calibration text
(per input channel, all tokens) and the weight maximum over every linear sharing the input.
Measured on Gemma 3 270M (eager, int8 per-channel weights + int8 per-token activations
fake-quantized; alpha sweep calibrated on the first 1,022 tokens of
/usr/share/common-licenses/GPL-3): mean KL 0.022 -> 0.011 (alpha 0.5), 0.010 (0.6), 0.013
(0.75), 0.019 (0.85); calibrated on random token ids instead: 0.199 (the calibration must be
real text). As shipped (alpha 0.5, 1,022 tokens of Python's documentation, torchao's
emulation of the XNNPACK numerics): 0.012.

Contract: ``smooth_activations`` changes the float model's weights and norm scales only; its
float outputs stay equal to the original's (up to fp32 rounding; tests assert rel <= 1e-5) and
its KV caches are reset after calibration. Layers whose structure does not match a rule are
left alone and named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

DEFAULT_ALPHA = 0.5
CALIBRATION_TOKENS = 1022  # two 512-token windows (BOS + 511)


# ----------------------------------------------------------------------------- calibration text


def calibration_text() -> tuple[str, str]:
    """``(text, source)``: Python's own documentation (``pydoc_data.topics``, shipped with
    every CPython), the topics in sorted order. Prose and code, not the license texts
    bench/quality.py scores."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (Python's documentation)"


def calibration_windows(tokenizer: Any, text: str | None = None, n_tokens: int = CALIBRATION_TOKENS,
                        window: int = 512) -> list[list[int]]:
    """``[BOS] + (window - 1)`` token windows of the first ``n_tokens`` tokens of ``text``
    (default :func:`calibration_text`)."""
    if text is None:
        text = calibration_text()[0]
    ids = tokenizer.encode(text, add_bos=False)[:n_tokens]
    if not ids:
        raise ValueError("activation smoothing: the calibration text encodes to no tokens")
    step = window - 1
    return [[tokenizer.bos_id] + ids[s:s + step] for s in range(0, len(ids), step)]


@torch.no_grad()
def input_absmax(model: nn.Module, windows: Iterable[Sequence[int]],
                 forward: Callable[[nn.Module, Tensor, Tensor], Any] | None = None) -> dict[str, Tensor]:
    """``{linear name: (in_features,) max |input| per channel}`` over every token of ``windows``.

    ``forward(model, tokens (1, L), input_pos (L,))`` runs one window (default: ``model(tokens,
    input_pos)``); ``model.reset_caches()`` runs before each window and after the last.
    """
    amax: dict[str, Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(_mod, args, name=name):
                a = args[0].detach().abs().flatten(0, -2).amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            hooks.append(mod.register_forward_pre_hook(hook))
    run_windows(model, windows, hooks, forward)
    return amax


@torch.no_grad()
def run_windows(model: nn.Module, windows: Iterable[Sequence[int]], hooks: list,
                forward: Callable[[nn.Module, Tensor, Tensor], Any] | None = None,
                before_window: Callable[[], None] | None = None) -> None:
    """Run each window through ``model`` (caches reset before each window and after the last),
    then remove ``hooks`` (the calibration hooks the caller registered), even on error."""
    reset = getattr(model, "reset_caches", lambda: None)
    run = forward or (lambda m, t, p: m(t, p))
    try:
        for w in windows:
            reset()
            if before_window:
                before_window()
            run(model, torch.tensor([list(w)]), torch.arange(len(w)))
    finally:
        for h in hooks:
            h.remove()
        reset()


# ----------------------------------------------------------------------------- folding


@dataclass
class SmoothingReport:
    """What :func:`smooth_activations` folded: ``{site: linears}`` and the sites left alone."""

    alpha: float
    source: str = ""
    smoothed: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # site -> reason
    # site -> s: the smoothed linears' input channel j was scaled by s_j (their columns by s_j)
    scales: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> str:
        n = sum(len(v) for v in self.smoothed.values())
        s = f"activation smoothing alpha {self.alpha}: {n} linear(s) at {len(self.smoothed)} site(s)"
        if self.source:
            s += f", calibrated on {self.source}"
        if self.skipped:
            s += f"; left alone: {len(self.skipped)} ({next(iter(self.skipped.values()))})"
        return s


def _smooth_scale(xmax: Tensor, wmax: Tensor, alpha: float) -> Tensor:
    """s = max|x|^alpha / max|W_col|^(1-alpha), elementwise (clamped away from 0)."""
    return (xmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def _scales(xmax: Tensor, linears: Sequence[nn.Linear], alpha: float) -> Tensor:
    """(in_features,) :func:`_smooth_scale` with the weight maximum over every linear sharing x."""
    wmax = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in linears]).amax(0)
    return _smooth_scale(xmax, wmax, alpha)


def _scale_columns(lin: nn.Linear, s: Tensor) -> None:  # W[:, j] *= s_j
    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)


def _scale_rows(lin: nn.Linear, s: Tensor) -> None:  # W[j, :] *= s_j, b_j *= s_j
    lin.weight.data = (lin.weight.data.float() * s[:, None]).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.float() * s).to(lin.bias.dtype)


def _fold_into_norm(norm: nn.Module, inv: Tensor) -> bool:
    """Multiply the norm's effective scale by ``inv``; False when the norm has no scale."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, nn.Parameter) or w.shape != inv.shape:
        return False
    offset = bool(getattr(norm, "unit_offset", False))  # Gemma 3: scale = 1 + weight
    eff = (1.0 + w.data.float()) if offset else w.data.float()
    eff = eff * inv
    w.data = (eff - 1.0 if offset else eff).to(w.dtype)
    return True


def _untie_head(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return None
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.weight is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone())
    return head


def smooth_activations(model: nn.Module, amax: dict[str, Tensor], alpha: float = DEFAULT_ALPHA,
                       source: str = "") -> SmoothingReport:
    """Fold smoothing scales into ``model`` (fxport's Gemma decoder layout, see the module doc).

    ``amax``: :func:`input_absmax` of the float model. Returns what was folded where, with the
    scales (``report.scales[site]``: a lookup sharing the head's codes divides by the head's).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"activation smoothing: alpha must be in [0, 1], got {alpha}")
    report = SmoothingReport(alpha, source)

    def fold(site: str, producer: Callable[[Tensor], bool], names: Sequence[str], mods: Sequence[nn.Linear]) -> None:
        ran = [i for i, n in enumerate(names) if n in amax]  # a KV-sharing layer never runs its k/v_proj
        if not ran:
            report.skipped[site] = "no calibration statistics (the linear did not run)"
            return
        names, mods = [names[i] for i in ran], [mods[i] for i in ran]
        xmax = torch.stack([amax[n] for n in names]).amax(0)
        s = _scales(xmax, mods, alpha)
        if not producer(1.0 / s):
            report.skipped[site] = "its producer has no scale to fold into"
            return
        for lin in mods:
            _scale_columns(lin, s)
        report.smoothed[site] = list(names)
        report.scales[site] = s

    inner = getattr(model, "model", model)
    shares_kv = bool(getattr(getattr(model, "config", None), "num_kv_shared_layers", 0))
    for i, layer in enumerate(getattr(inner, "layers", [])):
        p = f"{_prefix(model, inner)}layers.{i}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and hasattr(layer, "input_layernorm"):
            qkv = [(n, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj") if isinstance(getattr(attn, n, None), nn.Linear)]
            fold(f"{p}.input_layernorm", lambda inv, L=layer: _fold_into_norm(L.input_layernorm, inv),
                 [f"{p}.self_attn.{n}" for n, _ in qkv], [m for _, m in qkv])
            if shares_kv:  # later layers read this V through o_proj's that would not be rescaled
                report.skipped[f"{p}.self_attn.v_proj"] = "the model shares KV caches across layers"
            else:
                _fold_v_into_o(attn, f"{p}.self_attn", amax, alpha, report)
        if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            if hasattr(layer, "pre_feedforward_layernorm"):
                fold(f"{p}.pre_feedforward_layernorm", lambda inv, L=layer: _fold_into_norm(L.pre_feedforward_layernorm, inv),
                     [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [mlp.gate_proj, mlp.up_proj])

            def into_up(inv, up=mlp.up_proj):
                _scale_rows(up, inv)
                return True

            fold(f"{p}.mlp.up_proj", into_up, [f"{p}.mlp.down_proj"], [mlp.down_proj])
    head = _untie_head(model)
    norm = getattr(inner, "norm", None)
    if head is not None and norm is not None:
        fold(f"{_prefix(model, inner)}norm", lambda inv: _fold_into_norm(norm, inv), ["lm_head"], [head])
    return report


def _fold_v_into_o(attn: nn.Module, p: str, amax: dict[str, Tensor], alpha: float, report: SmoothingReport) -> None:
    """o_proj's input channel (head h, dim d) is V channel (h // n_rep, d): one scale per V channel."""
    site = f"{p}.v_proj"
    v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
    if not isinstance(v, nn.Linear) or not isinstance(o, nn.Linear):
        report.skipped[site] = "no separate v_proj/o_proj"
        return
    if getattr(attn, "v_norm", None) is not None:
        report.skipped[site] = "V is normalized after v_proj (a row scale would be undone)"
        return
    if f"{p}.o_proj" not in amax:
        report.skipped[site] = "no calibration statistics (the linear did not run)"
        return
    n_kv, hd = v.out_features // attn.head_dim, attn.head_dim
    n_rep = o.in_features // v.out_features
    xmax = amax[f"{p}.o_proj"].view(n_kv, n_rep, hd).amax(1)                        # (n_kv, hd)
    wmax = o.weight.detach().float().abs().amax(0).view(n_kv, n_rep, hd).amax(1)   # (n_kv, hd)
    s = _smooth_scale(xmax, wmax, alpha)
    _scale_rows(v, 1.0 / s.reshape(-1))
    _scale_columns(o, s[:, None, :].expand(n_kv, n_rep, hd).reshape(-1))
    report.smoothed[site] = [f"{p}.o_proj"]


def _prefix(model: nn.Module, inner: nn.Module) -> str:
    return "model." if inner is not model else ""
