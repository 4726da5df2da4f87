"""The multimodal Gemma 4 build: the pass set per method and the one-call XNNPACK export.

The model side (``fxport.models.gemma4.export.export_multimodal_methods``: image_encoder [,
audio_encoder], prefill with features, decode, in functional ATen IR; ``multimodal_metadata``)
stays with the model; what the builder adds lives here, so ``models/`` imports neither
``passes/`` nor ``lowering/``:

* :func:`multimodal_passes`: FixedSlotFusion for the prefill's ``masked_scatter`` merge;
* :func:`audio_encoder_passes`: the CPU rewrite the audio tower needs before XNNPACK;
* :func:`rewrite_multimodal_programs`: the whole CPU pass set per method;
* :func:`export_multimodal_pte`: model -> one XNNPACK ``.pte`` (methods sharing one KV cache).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from fxport.models.gemma4.export import export_multimodal_methods, multimodal_metadata


def multimodal_passes(model: torch.nn.Module) -> list:
    """FixedSlotFusion (exact dynamic mode) for every placeholder the prefill merges, padding
    placeholders before embedding lookups: the pass to run on ``prefill`` before the CPU set."""
    from fxport.passes.fixed_slot_fusion import FixedSlotFusion

    cfg = model.config
    ids = [cfg.image_token_id] + ([cfg.audio_token_id] if cfg.audio is not None else [])
    return [FixedSlotFusion(mode="dynamic", placeholder_token_id=ids, pad_token_id=cfg.text.pad_token_id)]


def audio_encoder_passes() -> list:
    """CPU passes for the ``audio_encoder`` method before XNNPACK: RMSNorm as a linear mean (the
    tower's 9 RMSNorms per layer otherwise split the delegate at each one)."""
    from fxport.passes.xnnpack import RMSNormAsLinear

    return [RMSNormAsLinear()]


def rewrite_multimodal_programs(model: torch.nn.Module, programs: dict[str, ExportedProgram],
                                max_prefill_chunk: int, ring_size: int | None = None, dump=None):
    """The CPU pass set on each method (FixedSlotFusion first on prefill, the text CPU set on
    prefill / decode, GeluTanhAsTanh on the encoders: the text set has it already). Ring size default:
    ``max(2 W, W + max_prefill_chunk - 1)`` so that a chunk holding a whole image fits the ring.
    Returns (programs, {method: PipelineResult})."""
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes

    text = model.config.text
    if ring_size is None and "sliding_attention" in text.layer_types:
        ring_size = max(2 * text.sliding_window, text.sliding_window + max_prefill_chunk - 1)
    passes = cpu_passes(model, ring_size=ring_size)
    passes["prefill"] = multimodal_passes(model) + passes["prefill"]
    if "audio_encoder" in programs:
        passes["audio_encoder"] = audio_encoder_passes()
    # XNNPACK's GELU is the erf form whatever ``approximate`` says: spell the tanh form out.
    from fxport.passes.xnnpack.gelu_tanh_as_tanh import GeluTanhAsTanh

    passes = {m: list(passes[m]) if m in ("prefill", "decode") else [GeluTanhAsTanh()] + list(passes.get(m, []))
              for m in programs}
    return apply_method_passes(programs, passes, dump=dump)


def export_multimodal_pte(model: torch.nn.Module, out, *, max_prefill_chunk: int = 64,
                          max_soft_tokens: int = 280, max_audio_frames: int | None = None,
                          ring_size: int | None = None, dump=None, on_stage=None):
    """Multimodal Gemma 4 -> one XNNPACK ``.pte`` with methods image_encoder [, audio_encoder],
    prefill, decode sharing one KV cache. Returns the lowered program (``XnnpackProgram``)."""
    from fxport.lowering.xnnpack import lower_to_xnnpack

    inner = getattr(model, "model", None)
    if getattr(inner, "vision_tower", None) is None and getattr(inner, "audio_tower", None) is None:
        raise ValueError(f"export_multimodal_pte: {type(model).__name__} has no vision or audio tower (a text-only "
                         "model); export it with fxport.builder.build (fxport export), or pass a "
                         "Gemma4ForConditionalGeneration built from a config with a vision or audio part")
    stage = on_stage or (lambda name: None)
    stage("export")
    with torch.no_grad():
        programs = export_multimodal_methods(model, max_prefill_chunk, max_soft_tokens=max_soft_tokens,
                                             max_audio_frames=max_audio_frames)
    stage("passes")
    programs, _ = rewrite_multimodal_programs(model, programs, max_prefill_chunk, ring_size, dump)
    stage("lower")
    meta = multimodal_metadata(model, max_prefill_chunk, max_soft_tokens, max_audio_frames)
    lowered = lower_to_xnnpack(programs, constant_methods=meta, on_stage=on_stage)
    stage("save")
    lowered.save(out)
    return lowered
