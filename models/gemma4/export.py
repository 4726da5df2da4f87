"""Export the eager Gemma model into two programs: "prefill" (dynamic L) and "decode" (L = 1).

Both programs come from the same module, so they have identical parameter and buffer names
(the KV caches ``model.layers.{i}.self_attn.k_cache`` / ``v_cache`` are mutated buffers in
both), and both are in functional ATen IR (``torch.export.export(...).run_decompositions({})``).
Works with the model on the meta device (``with torch.device("meta"): model = ...``): example
inputs are created on the model's device, so no real weights are needed to trace.
"""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from .model import Gemma4ForCausalLM


def _device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def export_methods(
    model: Gemma4ForCausalLM,
    max_prefill_chunk: int | None = None,
    multimodal: bool = False,
    strict: bool = False,
    max_seq_len: int | None = None,
) -> dict[str, ExportedProgram]:
    """{"prefill": ExportedProgram, "decode": ExportedProgram} in functional ATen IR.

    prefill(tokens (B, L), input_pos (L,)[, mm_features (N, hidden)]) with L dynamic in
    [1, max_prefill_chunk] (max_prefill_chunk <= model.max_seq_len; default: max_seq_len) and,
    when ``multimodal``, N dynamic in [1, B * max_prefill_chunk].
    decode(tokens (B, 1), input_pos (1,)).
    ``max_seq_len``, if given, must equal ``model.max_seq_len`` (the cache length is fixed
    when the model is built).
    """
    S, B = model.max_seq_len, model.max_batch_size
    if max_seq_len is not None and max_seq_len != S:
        raise ValueError(
            f"export_methods: max_seq_len={max_seq_len} differs from the model's cache length "
            f"{S}; build Gemma4ForCausalLM(config, max_seq_len={max_seq_len}) instead."
        )
    C = S if max_prefill_chunk is None else max_prefill_chunk
    if not 1 <= C <= S:
        raise ValueError(
            f"export_methods: max_prefill_chunk={C} must be in [1, max_seq_len={S}]; "
            "pass a smaller max_prefill_chunk or build the model with a larger max_seq_len."
        )
    dev = _device(model)
    hidden = model.config.hidden_size

    def tokens(n: int) -> torch.Tensor:
        return torch.zeros(B, n, dtype=torch.long, device=dev)

    def positions(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.long, device=dev)

    def run(args: tuple, dynamic_shapes) -> ExportedProgram:
        ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=strict)
        return ep.run_decompositions({})

    n = min(2, C)  # example length; 1 would specialize the dynamic dim
    if C > 1:
        L = Dim("L", min=1, max=C)
        shapes: tuple = ({1: L}, {0: L})
    else:
        shapes = (None, None)
    args: tuple = (tokens(n), positions(n))
    if multimodal:
        dtype = next(model.parameters()).dtype
        args += (torch.zeros(n, hidden, dtype=dtype, device=dev),)
        shapes += ({0: Dim("N", min=1, max=B * C)} if B * C > 1 else None,)
    prefill = run(args, shapes)
    decode = run((tokens(1), positions(1)), None)
    return {"prefill": prefill, "decode": decode}
