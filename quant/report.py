"""Quantization quality report, as the TICO PTQ PR prints it.

Metrics between a reference tensor ``ref`` (unquantized model) and ``out`` (quantized model):

* ``mean |diff|`` = ``mean(|out - ref|)``
* ``PEIR`` (peak error to interval ratio) = ``max(|out - ref|) / (max(ref) - min(ref))``

:func:`quality_report` runs both models on the same tokens and reports those metrics for the
output of every decoder layer (modules named ``...layers.<i>``) and for the logits, plus
greedy-token agreement: the share of positions (prompt + ``gen_tokens`` greedy tokens of the
reference model, teacher-forced) where both models pick the same next token, and how many
tokens free-running greedy generation of the two models shares before the first divergence.
Models follow the fxport eager contract ``model(tokens (B, L), input_pos (L,)) -> logits``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn


def mean_abs_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().mean())


def peir(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Peak error / interval of the reference (0 when the reference is constant and equal)."""
    peak = float((out.double() - ref.double()).abs().max())
    interval = float(ref.double().max() - ref.double().min())
    if interval == 0.0:
        return 0.0 if peak == 0.0 else float("inf")
    return peak / interval


@dataclass
class TensorStat:
    name: str
    mean_abs_diff: float
    peir: float

    @classmethod
    def of(cls, name: str, ref: torch.Tensor, out: torch.Tensor) -> "TensorStat":
        return cls(name, mean_abs_diff(ref, out), peir(ref, out))


@dataclass
class QualityReport:
    title: str
    layers: list[TensorStat] = field(default_factory=list)
    logits: TensorStat | None = None
    token_agreement: float = float("nan")  # teacher-forced, over compared positions
    positions: int = 0
    free_run_common_prefix: int = 0
    free_run_tokens: int = 0

    def __str__(self) -> str:
        w = 60
        lines = [f"┌{'─' * 3} {self.title} {'─' * max(1, w - len(self.title) - 5)}"]
        for s in self.layers:
            lines.append(f"│ {s.name:<28}: mean |diff| {s.mean_abs_diff:.6f}  PEIR {s.peir * 100:8.4f} %")
        if self.logits is not None:
            lines.append(f"│ {'logits':<28}: mean |diff| {self.logits.mean_abs_diff:.6f}  PEIR {self.logits.peir * 100:8.4f} %")
        lines.append(
            f"│ {'greedy agreement':<28}: {self.token_agreement * 100:.2f} % of {self.positions} positions (teacher-forced)"
        )
        lines.append(
            f"│ {'free-run common prefix':<28}: {self.free_run_common_prefix} / {self.free_run_tokens} tokens"
        )
        lines.append(f"└{'─' * w}")
        return "\n".join(lines)


_LAYER = re.compile(r"(.*\.)?layers\.\d+")


def _capture(model: nn.Module, store: dict[str, torch.Tensor]) -> list:
    handles = []
    for name, mod in model.named_modules():
        if _LAYER.fullmatch(name):
            def hook(_m, _i, out, name=name):
                store[name] = (out[0] if isinstance(out, (tuple, list)) else out).detach().float().clone()

            handles.append(mod.register_forward_hook(hook))
    return handles


@torch.no_grad()
def _forward(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}
    handles = _capture(model, store)
    try:
        logits = model(tokens, torch.arange(tokens.shape[1]))
    finally:
        for h in handles:
            h.remove()
    return logits.float(), store


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation (1, steps) of ``prompt`` (1, L): one prefill, then decode steps."""
    logits = model(prompt, torch.arange(prompt.shape[1]))
    out = [int(logits[0, -1].argmax())]
    pos = prompt.shape[1]
    for _ in range(steps - 1):
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))
        out.append(int(logits[0, -1].argmax()))
        pos += 1
    return torch.tensor([out])


def quality_report(
    reference: nn.Module, quantized: nn.Module, prompt: torch.Tensor, gen_tokens: int = 16, title: str = "Quantization Error Summary"
) -> QualityReport:
    """Compare ``quantized`` against ``reference`` on ``prompt`` (1, L) token ids."""
    ref_gen = greedy(reference, prompt, gen_tokens)
    q_gen = greedy(quantized, prompt, gen_tokens)
    common = int((ref_gen == q_gen).int().cumprod(-1).sum())
    seq = torch.cat([prompt, ref_gen[:, :-1]], dim=1)  # teacher forcing on the reference's tokens
    ref_logits, ref_layers = _forward(reference, seq)
    q_logits, q_layers = _forward(quantized, seq)
    layers = [TensorStat.of(name, ref_layers[name], q_layers[name]) for name in ref_layers if name in q_layers]
    agree = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float()
    return QualityReport(
        title=title,
        layers=layers,
        logits=TensorStat.of("logits", ref_logits, q_logits),
        token_agreement=float(agree.mean()),
        positions=agree.numel(),
        free_run_common_prefix=common,
        free_run_tokens=gen_tokens,
    )
