"""Export the eager Gemma model into two programs: "prefill" (dynamic L) and "decode" (L = 1).

Both programs come from the same module, so they have identical parameter and buffer names
(the KV caches ``model.layers.{i}.self_attn.k_cache`` / ``v_cache`` are mutated buffers in
both), and both are in functional ATen IR (``torch.export.export(...).run_decompositions({})``).
Works with the model on the meta device (``with torch.device("meta"): model = ...``): example
inputs are created on the model's device, so no real weights are needed to trace.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from fxport import contract

from .model import Gemma4ForCausalLM


# Speculative decoding's verify method (ExecuTorch RFC #19784 / the EAGLE-3 PR stack's name): the
# prefill graph again (same inputs, same L bound, same KV buffers by name), exported separately so
# the passes can leave LastTokenLogits out -- it returns the logits of every token, (1, L, V).
VERIFY = contract.VERIFY


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
    max_soft_tokens: int = 280,
    max_audio_frames: int | None = None,
    methods: tuple[str, ...] = ("prefill", "decode"),
) -> dict[str, ExportedProgram]:
    """{"prefill": ExportedProgram, "decode": ExportedProgram} in functional ATen IR.

    prefill(tokens (B, L), input_pos (L,)[, mm_features (N, hidden)]) with L dynamic in
    [1, max_prefill_chunk] (max_prefill_chunk <= model.max_seq_len; default: max_seq_len) and,
    when ``multimodal``, N dynamic in [1, B * max_prefill_chunk].
    decode(tokens (B, 1), input_pos (1,)).
    ``methods=("prefill",)`` exports prefill alone: a backend whose prefill at L = 1 is as fast
    as a decode method (XNNPACK: it resizes only when L changes) runs every step through it, and
    exports, lowers and loads half as much.
    ``max_seq_len``, if given, must equal ``model.max_seq_len`` (the cache length is fixed
    when the model is built).

    With a :class:`~fxport.models.gemma4.multimodal.Gemma4ForConditionalGeneration` and
    ``multimodal=True`` the methods are those of :func:`export_multimodal_methods`
    (``image_encoder`` at ``max_soft_tokens`` soft tokens per image, ``audio_encoder`` at
    ``max_audio_frames`` mel frames when the model has an audio tower, ``prefill`` taking the
    encoders' features, ``decode``).
    """
    from .multimodal import Gemma4ForConditionalGeneration

    if isinstance(model, Gemma4ForConditionalGeneration):
        if not multimodal:
            raise ValueError(
                "export_methods: a Gemma4ForConditionalGeneration exports with multimodal=True "
                "(image_encoder / prefill with features / decode); pass multimodal=True."
            )
        return export_multimodal_methods(model, max_prefill_chunk, strict=strict, max_seq_len=max_seq_len,
                                         max_soft_tokens=max_soft_tokens, max_audio_frames=max_audio_frames)
    unknown = sorted(set(methods) - {"prefill", "decode", VERIFY})
    if unknown or not methods:
        raise ValueError(f"export_methods: methods={tuple(methods)!r}; choose from 'prefill' and 'decode'"
                         f" (and {VERIFY!r} for speculative decoding)")
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
    out = {}
    if "prefill" in methods:
        out["prefill"] = run(args, shapes)
    if "decode" in methods:
        out["decode"] = run((tokens(1), positions(1)), None)
    if VERIFY in methods:  # speculative decoding (fxport.runtime.speculative): see VERIFY
        out[VERIFY] = run(args, shapes)
    return out


class ImageEncoder(torch.nn.Module):
    """``image_encoder`` method: one image's patches -> its soft tokens in text hidden size.

    pixel_values (1, P, 3 p^2) in [0, 1], pixel_position_ids (1, P, 2) int64 ((-1, -1) on
    padding) -> features (P / k^2, hidden); the first ``real_patches / k^2`` rows are the image's
    soft tokens, the rest are padding cells (the runtime passes only the first rows on).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:
        feats, _ = self.model.encode_images(pixel_values, pixel_position_ids)
        return feats[0]


def export_multimodal_methods(
    model: torch.nn.Module,
    max_prefill_chunk: int | None = None,
    *,
    strict: bool = False,
    max_seq_len: int | None = None,
    max_soft_tokens: int = 280,
    max_audio_frames: int | None = None,
) -> dict[str, ExportedProgram]:
    """Methods of a multimodal Gemma 4 program, in functional ATen IR, every shape bounded:

    * ``image_encoder(pixel_values (1, P, 3 p^2), pixel_position_ids (1, P, 2)) -> (P / k^2, H)``
      with P = max_soft_tokens * k^2 fixed (padding by masks; no nonzero / item / assert);
    * ``audio_encoder(input_features (1, T, n_mels), input_features_mask (1, T)) ->
      (features (1, T', H), mask (1, T'))`` with T = max_audio_frames (only with an audio tower);
    * ``prefill(tokens (B, L), input_pos (L,), image_features (N, H)[, audio_features (M, H)])``
      with L in [1, max_prefill_chunk], N, M in [1, B * max_prefill_chunk]: the rows of this
      chunk's placeholders in order (pass one zero row when the chunk has none). The merge is
      ``masked_scatter``: apply FixedSlotFusion (``fxport.builder.multimodal.multimodal_passes``) before lowering;
    * ``decode(tokens (B, 1), input_pos (1,))``.
    prefill and decode mutate the same KV-cache buffers; the encoders mutate none.
    """
    S, B = model.max_seq_len, model.max_batch_size
    if max_seq_len is not None and max_seq_len != S:
        raise ValueError(
            f"export_methods: max_seq_len={max_seq_len} differs from the model's cache length {S}; "
            f"build Gemma4ForConditionalGeneration(config, max_seq_len={max_seq_len}) instead."
        )
    C = S if max_prefill_chunk is None else max_prefill_chunk
    if not 2 <= C <= S:
        raise ValueError(
            f"export_methods: max_prefill_chunk={C} must be in [2, max_seq_len={S}] for a multimodal "
            "program; pass a larger max_prefill_chunk."
        )
    if max_soft_tokens < 1:
        raise ValueError(f"export_methods: max_soft_tokens={max_soft_tokens} must be >= 1.")
    cfg = model.config
    dev = _device(model)
    dtype = next(model.parameters()).dtype
    H = cfg.text.hidden_size
    out: dict[str, ExportedProgram] = {}

    def run(module, args, dynamic_shapes=None) -> ExportedProgram:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)
        return ep.run_decompositions({})

    if cfg.vision is not None:
        k, p = cfg.vision.pooling_kernel_size, cfg.vision.patch_size
        P = max_soft_tokens * k * k
        pv = torch.zeros(1, P, 3 * p * p, dtype=dtype, device=dev)
        pos = torch.zeros(1, P, 2, dtype=torch.long, device=dev)
        out["image_encoder"] = run(ImageEncoder(model).eval(), (pv, pos))
    if cfg.audio is not None:
        if max_audio_frames is None:
            raise ValueError(
                "export_methods: the model has an audio tower; pass max_audio_frames= (mel frames per "
                "clip the audio_encoder method accepts)."
            )
        from .audio import audio_encoder_method

        out["audio_encoder"] = audio_encoder_method(model.model.audio_tower, max_audio_frames,
                                                    model.model.embed_audio, strict=strict)

    L, N = Dim("L", min=1, max=C), Dim("N", min=1, max=B * C)
    args: tuple = (torch.zeros(B, 2, dtype=torch.long, device=dev), torch.arange(2, device=dev))
    shapes: tuple = ({1: L}, {0: L})
    args += (torch.zeros(2, H, dtype=dtype, device=dev),)
    shapes += ({0: N},)
    if cfg.audio is not None:
        args += (torch.zeros(2, H, dtype=dtype, device=dev),)
        shapes += ({0: Dim("M", min=1, max=B * C)},)
    out["prefill"] = run(model, args, shapes)
    out["decode"] = run(model, (torch.zeros(B, 1, dtype=torch.long, device=dev),
                                torch.zeros(1, dtype=torch.long, device=dev)))
    return out


def multimodal_metadata(model: torch.nn.Module, max_prefill_chunk: int, max_soft_tokens: int,
                        max_audio_frames: int | None = None) -> dict[str, Any]:
    """Constant methods a multimodal ``.pte`` carries: the runner contract's
    (:func:`fxport.contract.runner_metadata`) and those the runtime's image / audio path reads."""
    from fxport.contract import runner_metadata

    cfg = model.config
    t = cfg.text
    eos = list(t.eos_token_id) if isinstance(t.eos_token_id, (list, tuple)) else [t.eos_token_id]
    meta = runner_metadata(max_prefill_chunk=max_prefill_chunk, max_context_len=int(model.max_seq_len),
                           eos_ids=eos, vocab_size=int(t.vocab_size), bos_id=int(t.bos_token_id), logits="last")
    meta.update({
        "get_hidden_size": int(t.hidden_size),
        "get_image_token_id": int(t.image_token_id),
        "get_boi_token_id": int(cfg.boi_token_id),
        "get_eoi_token_id": int(cfg.eoi_token_id),
        "get_use_bidirectional_vision": int(t.use_bidirectional_attention == "vision"),
    })
    if cfg.vision is not None:
        meta.update(get_patch_size=int(cfg.vision.patch_size),
                    get_pooling_kernel_size=int(cfg.vision.pooling_kernel_size),
                    get_max_soft_tokens=int(max_soft_tokens))
    if cfg.audio is not None and t.audio_token_id is not None:
        meta.update(get_audio_token_id=int(t.audio_token_id), get_boa_token_id=int(cfg.boa_token_id),
                    get_eoa_token_id=int(cfg.eoa_token_id), get_max_audio_frames=int(max_audio_frames or 0))
    return meta
