"""GPTQ rounding (Frantar et al. 2022) on a fixed quantization grid: which integer each weight
becomes, chosen so the layer's output error on calibration activations is small, not each
weight's own error.

Round-to-nearest (RTN) rounds every weight independently. GPTQ walks the input columns in
order and, after rounding column ``i``, spreads its rounding error over the columns not yet
rounded, weighted by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs ``X``:
errors that the remaining columns can compensate (correlated inputs) are compensated. The grid
(group scales and zero points) is kept as given: here, the grid torchao chose for the
XNNPACK form (min-max or HQQ scales), so the result is the same tensor type with other
integers, lowered exactly as before (:func:`apply_gptq` rewrites ``qdata`` in place).

Contract: ``gptq_round(W, H, scale, zero, ...)`` returns integer codes in ``[qmin, qmax]`` on
that grid; with ``H = I`` (no correlation) it equals RTN. The output error
``||X (W - W_q)^T||`` on the calibration inputs is never worse than RTN's in expectation and
measured lower (tests assert it on correlated inputs).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fxport.quant.smoothing import run_windows


@torch.no_grad()
def input_hessians(model: nn.Module, windows: Iterable[Sequence[int]], names: set[str],
                   forward: Callable[[nn.Module, Tensor, Tensor], Any] | None = None) -> dict[str, Tensor]:
    """``{linear name: (K, K) float32 X^T X / n}`` of the inputs of the linears in ``names``.

    ``forward(model, tokens (1, L), input_pos (L,))`` runs one window (default ``model(tokens,
    input_pos)``); ``model.reset_caches()`` runs before each window and after the last. Linears
    reading the same input share one matrix (computed once).
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    by_input: dict[int, tuple[Tensor, str]] = {}  # id(input) -> (input kept alive, first linear), per forward
    alias: dict[str, str] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name in names and isinstance(mod, nn.Linear):
            def hook(_mod, args, name=name):
                x = args[0]
                first = by_input.setdefault(id(x), (x, name))[1]  # x held: its id is not reused
                if first != name:
                    alias[name] = first
                    return
                x = x.detach().flatten(0, -2).float()  # (n, K)
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    run_windows(model, windows, hooks, forward, before_window=by_input.clear)
    out = {n: sums[n] / counts[n] for n in sums}
    for n, first in alias.items():
        if first in out:
            out[n] = out[first]
    return out


@torch.no_grad()
def gptq_round(w: Tensor, hessian: Tensor, scale: Tensor, zero: Tensor, group_size: int,
               qmin: int, qmax: int, damp: float = 0.01, block: int = 128) -> Tensor:
    """Integer codes (N, K) int8 for ``w`` (N, K) on the grid ``(q - zero) * scale``.

    ``scale`` / ``zero``: (N, K // group_size) per group of ``group_size`` input columns.
    ``hessian``: (K, K) ``X^T X / n``; ``damp`` of its mean diagonal is added for stability
    (the GPTQ paper's 1%). Columns whose input never varied (zero diagonal) round to nearest.
    """
    W = w.detach().float().clone()
    N, K = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    # upper Cholesky factor of H^-1: row i holds how the columns after i absorb column i's error
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s = scale.float().repeat_interleave(group_size, dim=1)  # (N, K)
    z = zero.float().repeat_interleave(group_size, dim=1)
    Q = torch.empty(N, K, dtype=torch.int8)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2]  # a view: updated in place
        err1 = torch.empty(N, i2 - i1)
        h1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            q = torch.clamp(torch.round(W1[:, j] / s[:, c] + z[:, c]), qmin, qmax)
            Q[:, c] = q.to(torch.int8)
            e = (W1[:, j] - (q - z[:, c]) * s[:, c]) / h1[j, j]
            W1[:, j + 1:] -= e[:, None] * h1[j, j + 1:][None, :]
            err1[:, j] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q


def apply_gptq(model: nn.Module, hessians: dict[str, Tensor], float_weights: dict[str, Tensor]) -> list[str]:
    """Re-round torchao int4 group-wise weights (``IntxUnpackedToInt8Tensor``) with GPTQ.

    ``float_weights``: ``{linear name: (N, K) float weight before quantization}``; the grid
    (scale, zero point) torchao chose stays; only ``qdata`` changes. Returns the names done.
    """
    done = []
    mods = dict(model.named_modules())
    for name, w0 in float_weights.items():
        lin = mods.get(name)
        wq = getattr(lin, "weight", None)
        if name not in hessians or getattr(wq, "qdata", None) is None or wq.block_size[0] != 1:
            continue
        group = int(wq.block_size[1])
        info = torch.iinfo(torch.int8) if wq.target_dtype == torch.int8 else None
        qmin, qmax = (info.min, info.max) if info else (-8, 7)  # torch.int4
        zero = wq.zero_point if wq.zero_point is not None else torch.zeros_like(wq.scale)
        wq.qdata.copy_(gptq_round(w0, hessians[name], wq.scale, zero, group, qmin, qmax))
        done.append(name)
    return done
