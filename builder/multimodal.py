"""The multimodal Gemma 4 build: two program layouts, the pass set per method, the XNNPACK export.

**The runner layout** (:func:`export_runner_multimodal_pte`; what ``fxport export`` writes for a
multimodal checkpoint): ExecuTorch 1.5.1's stock ``MultimodalRunner``
(``executorch.extension.llm.runner``) runs it, and so does fxport's runtime. The runner prefills
a prompt as segments (``make_text_input`` / ``make_token_input``, ``make_image_input``,
``make_audio_input``); each segment becomes ``(1, n, E)`` embeddings that go whole into ONE
``text_decoder`` call at the running position (n = the segment's rows; the runner does not
chunk), and the position advances by n. Decoding is one token at a time: ``token_embedding``
of ``(1, 1)``, then ``text_decoder`` with ``cache_position = [pos]`` (shape ``(1,)``).

    method           inputs                                        output
    token_embedding  tokens int64 (1, T), T in [1, C]              (1, T, E) float32
    text_decoder     embeddings float32 (1, T, E), T in [1, C];    logits float32 (1, 1, V) (last row)
                     cache_position int64 (T,) = pos .. pos+T-1
    vision_encoder   image uint8 (3, H, W); h = H // s, w = W // s  (1, h*w + 2, E): boi, the h*w soft
                     in [2, get_max_image_cells], s = patch*pool,   tokens (row-major cells), eoi;
                     h*w <= get_max_soft_tokens (more: fails)       pixels past whole cells dropped
    audio_encoder    features float32 (1, F, n_mels),              (1, ceil(ceil(F/2)/2) + 2, E): boa,
                     F in [5, get_max_audio_frames]                soft tokens, eoa

    embedding columns (E = H + NL*P + 1):
      [0, H)          the embedding the decoder stack takes (token embedding * sqrt(H), or the
                      encoder's soft token after embed_vision / embed_audio)
      [H, H + NL*P)   PLE's token-identity lookup embed_tokens_per_layer(id) * sqrt(P), layer-major
                      (E2B / E4B; NL*P = 0 for 26B / 31B); soft tokens carry the pad id's, as
                      transformers looks placeholders up as the pad id; text_decoder adds the
                      context projection of columns [0, H) itself
      E - 1           vision flag: 1.0 on an image's soft tokens, else 0.0; with
                      use_bidirectional_attention == "vision" the sliding layers let the flagged
                      run of one call see itself both ways (an image is always one call)
    placeholder ids (image / video / audio) given to token_embedding are looked up as the pad id.

    constant methods: the text contract's (fxport.contract.runner_metadata: get_max_seq_len = C,
    get_max_context_len, use_kv_cache, enable_dynamic_shape, get_eos_ids, get_vocab_size,
    get_bos_id, ...) and fxport.contract.MULTIMODAL_CONSTANTS: get_hidden_size (H),
    get_per_layer_columns (NL*P), get_embedding_dim (E), get_use_bidirectional_vision,
    get_image_token_id, get_boi_token_id, get_eoi_token_id, get_patch_size,
    get_pooling_kernel_size, get_max_soft_tokens, get_max_image_cells, and with audio
    get_audio_token_id, get_boa_token_id, get_eoa_token_id, get_max_audio_frames.

What the caller does before ``make_image_input``: convert to RGB (alpha over white) and resize
(bicubic) to :func:`fxport.runtime.image.target_size` (height, width) for
``get_max_soft_tokens`` -- transformers' aspect-preserving resize, sides multiples of
``patch * pool`` -- then pass it as a uint8 (3, H, W) tensor (channels first: ExecuTorch 1.5.1's
``make_image_input`` reads every 3-D tensor as (C, H, W)); rescaling, patches and position ids
are in the graph. Before ``make_audio_input``: the log-mel features
(:func:`fxport.runtime.audio.log_mel_features`, transformers' extractor) of the real frames only
(``features[mask]``), as float32 (1, F, n_mels). Keep each segment within C =
``get_max_seq_len`` rows (split long text into several segments) and prompt + new tokens within
``get_max_context_len``. The sliding layers keep ring caches of ``max(2 W, W + C - 1)`` slots.

**The merged layout** (:func:`export_multimodal_pte`): ``image_encoder`` [, ``audio_encoder``],
``prefill(tokens, input_pos, image_features[, audio_features])`` merging the features into the
token embeddings inside the graph (``masked_scatter``, rewritten by FixedSlotFusion) and
``decode``; fxport's runtime runs it, the stock runner does not.

* :func:`multimodal_passes`: FixedSlotFusion for the merged prefill's ``masked_scatter`` merge;
* :func:`audio_encoder_passes`: the CPU rewrite the audio tower needs before XNNPACK;
* :func:`rewrite_multimodal_programs` / :func:`rewrite_runner_programs`: the CPU pass set per method;
* :func:`export_multimodal_pte` / :func:`export_runner_multimodal_pte`: model -> one XNNPACK ``.pte``;
* :class:`TextView` / :func:`quantize_multimodal`: a CPU recipe on the text decoder, the
  encoders int8 per channel (the default) or float32;
* :func:`is_multimodal_checkpoint` / :func:`build_multimodal`: what ``fxport export`` calls for a
  Hugging Face Gemma 4 directory with a vision / audio config (the runner layout, its tokenizer
  beside it, stage times), the multimodal counterpart of :func:`fxport.builder.build`.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from fxport import contract
from fxport.models.gemma4.export import export_multimodal_methods, multimodal_metadata
from fxport.models.gemma4.runner_methods import export_runner_methods, runner_metadata


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


def vision_encoder_passes() -> list:
    """CPU passes for the runner layout's ``vision_encoder`` before XNNPACK: RMSNorm as a linear
    mean, the boolean key mask as an additive one and SDPA as matmuls (each otherwise splits the
    delegate and runs in portable kernels)."""
    from fxport.passes.xnnpack import AdditiveAttentionMask, RMSNormAsLinear, SDPAAsMatmul, SymbolicViewAsInferred

    return [RMSNormAsLinear(), AdditiveAttentionMask(), SDPAAsMatmul(), SymbolicViewAsInferred()]


def rewrite_multimodal_programs(model: torch.nn.Module, programs: dict[str, ExportedProgram],
                                max_prefill_chunk: int, ring_size: int | None = None, dump=None):
    """The CPU pass set on each method (FixedSlotFusion first on prefill, the text CPU set on
    prefill / decode, GeluTanhAsSigmoid on the encoders: the text set has it already). Ring size default:
    ``max(2 W, W + max_prefill_chunk - 1)`` so that a chunk holding a whole image fits the ring.
    Returns (programs, {method: PipelineResult})."""
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
    from fxport.models.gemma4.model import sliding_window_buffers

    if ring_size is None:
        ring_size = ring_size_for(model, max_prefill_chunk)
    passes = cpu_passes(windows=sliding_window_buffers(model), ring_size=ring_size)
    passes["prefill"] = multimodal_passes(model) + passes["prefill"]
    if "audio_encoder" in programs:
        passes["audio_encoder"] = audio_encoder_passes()
    # XNNPACK's GELU is the erf form whatever ``approximate`` says: spell the tanh form out.
    from fxport.passes.xnnpack.gelu_tanh_as_sigmoid import GeluTanhAsSigmoid

    passes = {m: list(passes[m]) if m in ("prefill", "decode") else [GeluTanhAsSigmoid()] + list(passes.get(m, []))
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
    from fxport.builder import speedups as fast_paths

    stage = on_stage or (lambda name: None)
    with fast_paths.enabled(True) as fast, fast.fake_propagation():  # the builder's speedups (same bytes)
        stage("export")
        with torch.no_grad():
            programs = export_multimodal_methods(model, max_prefill_chunk, max_soft_tokens=max_soft_tokens,
                                                 max_audio_frames=max_audio_frames)
        with fast.codegen():
            stage("passes")
            programs, _ = rewrite_multimodal_programs(model, programs, max_prefill_chunk, ring_size, dump)
            stage("lower")
            meta = multimodal_metadata(model, max_prefill_chunk, max_soft_tokens, max_audio_frames)
            with fast.lowering():
                lowered = lower_to_xnnpack(programs, constant_methods=meta, on_stage=on_stage)
    stage("save")
    lowered.save(out)
    return lowered


def ring_size_for(model: torch.nn.Module, max_prefill_chunk: int) -> int | None:
    """``max(2 W, W + C - 1)``: a chunk of C rows (a whole image) fits the sliding layers' ring."""
    from fxport.passes.ring_buffer_kv_cache import default_ring_size

    text = model.config.text
    if "sliding_attention" not in text.layer_types:
        return None
    return default_ring_size(text.sliding_window, max_prefill_chunk)


def rewrite_runner_programs(model: torch.nn.Module, programs: dict[str, ExportedProgram], max_prefill_chunk: int,
                            ring_size: int | None = None, dump=None):
    """The CPU pass set on each method of the runner layout: ``text_decoder`` gets the text
    prefill set (RingBufferKVCache, the XNNPACK rewrites, LastTokenLogits), the encoders
    GeluTanhAsSigmoid (and the audio tower's RMSNormAsLinear), ``token_embedding`` nothing.
    Returns (programs, {method: PipelineResult})."""
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
    from fxport.models.gemma4.model import sliding_window_buffers
    from fxport.passes.xnnpack.gelu_tanh_as_sigmoid import GeluTanhAsSigmoid

    ring = ring_size if ring_size is not None else ring_size_for(model, max_prefill_chunk)
    text = cpu_passes(windows=sliding_window_buffers(model), ring_size=ring,
                      max_prefill_chunk=max_prefill_chunk)["prefill"]
    passes = {contract.TEXT_DECODER: text, contract.TOKEN_EMBEDDING: [],
              contract.VISION_ENCODER: [GeluTanhAsSigmoid()] + vision_encoder_passes(),
              contract.AUDIO_ENCODER: [GeluTanhAsSigmoid()] + audio_encoder_passes()}
    return apply_method_passes(programs, {m: passes[m] for m in programs}, dump=dump)


def export_runner_multimodal_pte(model: torch.nn.Module, out, *, max_prefill_chunk: int | None = None,
                                 max_soft_tokens: int = 280, max_image_cells: int | None = None,
                                 max_audio_frames: int | None = None, ring_size: int | None = None,
                                 dump=None, on_stage=None, speedups: bool = True, extra_eos=()):
    """Multimodal Gemma 4 -> one XNNPACK ``.pte`` in the runner layout (see the module docstring):
    ``token_embedding``, ``text_decoder`` [, ``vision_encoder``] [, ``audio_encoder``].

    max_prefill_chunk: C, the most rows of one segment (default: ``max_soft_tokens + 2`` with a
    vision tower, else 64, at most the model's ``max_seq_len``). ``extra_eos``: more ids that end
    generation (the tokenizer's ``<end_of_turn>``). ``out`` None: lower, write nothing
    (the caller publishes ``lowered.write``). Returns the lowered program (``XnnpackProgram``;
    ``.methods`` lists what it wrote; ``.pass_results`` and ``.metadata`` are added)."""
    from fxport.lowering.xnnpack import lower_to_xnnpack

    cfg = model.config
    if cfg.vision is None and cfg.audio is None:
        raise ValueError(f"export_runner_multimodal_pte: {type(model).__name__} has no vision or audio tower (a "
                         "text-only model); export it with fxport.builder.build (fxport export)")
    if max_prefill_chunk is None:
        max_prefill_chunk = min(max(64, max_soft_tokens + 2 if cfg.vision is not None else 0), int(model.max_seq_len))
    if cfg.audio is not None and max_audio_frames is None:
        from fxport.models.gemma4.audio import audio_output_length

        # the longest clip whose rows fit one segment
        max_audio_frames = max(f for f in range(1, 4 * max_prefill_chunk + 1)
                               if audio_output_length(f) + 2 <= max_prefill_chunk)
    from fxport.builder import speedups as fast_paths

    stage = on_stage or (lambda name: None)
    meta = runner_metadata(model, max_prefill_chunk, max_soft_tokens=max_soft_tokens,
                           max_image_cells=max_image_cells, max_audio_frames=max_audio_frames, extra_eos=extra_eos)
    # the builder's compile-time speedups, scoped as fxport.builder.build scopes them (same bytes)
    with fast_paths.enabled(speedups) as fast, fast.fake_propagation():
        stage("export")
        with torch.no_grad():
            programs = export_runner_methods(model, max_prefill_chunk, max_soft_tokens=max_soft_tokens,
                                             max_image_cells=max_image_cells, max_audio_frames=max_audio_frames)
        with fast.codegen():
            stage("passes")
            programs, results = rewrite_runner_programs(model, programs, max_prefill_chunk, ring_size, dump)
            stage("lower")
            with fast.lowering():
                lowered = lower_to_xnnpack(programs, constant_methods=meta, on_stage=on_stage)
    lowered.pass_results, lowered.metadata = results, meta
    if out is not None:
        stage("save")
        lowered.save(out)
    return lowered


ENCODER_PRECISIONS = ("int8", "float")
ENCODER_MODULES = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")


class TextView(torch.nn.Module):
    """The text decoder of a multimodal model as the quantization recipes see a text model
    (``.model`` the decoder stack with ``.layers`` and ``.embed_tokens``, ``.lm_head``, ``.config``
    the text config): activation smoothing and calibration look for ``.model.layers``. Calling it
    runs the whole multimodal model on token ids. Quantizing it quantizes the shared modules in
    place; the towers are not submodules, so a recipe never reaches them."""

    def __init__(self, mm: torch.nn.Module):
        super().__init__()
        self.model, self.lm_head, self.config = mm.model.language_model, mm.lm_head, mm.config.text
        self.max_seq_len = mm.max_seq_len
        self._mm = [mm]  # not a submodule: the towers stay out of the recipe's reach

    def forward(self, tokens, input_pos):
        return self._mm[0](tokens, input_pos)

    def reset_caches(self):
        self._mm[0].reset_caches()


class MultimodalQuantReport:
    """What :func:`quantize_multimodal` did: ``text`` the recipe's QuantReport on the text decoder,
    ``encoders`` {module: (n int8, n float)} (empty with float encoders)."""

    def __init__(self, text, encoder_precision: str, encoders: dict):
        self.text, self.encoder_precision, self.encoders = text, encoder_precision, encoders

    def summary(self) -> str:
        lines = [f"text decoder: {self.text.summary()}" if self.text is not None else "text decoder: float32"]
        if self.encoders:
            lines += [f"{name}: {q} linear(s) int8 per channel, {f} float" for name, (q, f) in self.encoders.items()]
        else:
            lines.append("encoders: float32")
        return "\n".join(lines)


def quantize_multimodal(model: torch.nn.Module, recipe: str | None, *, tokenizer=None,
                        encoder_precision: str = "int8") -> MultimodalQuantReport:
    """Quantize a multimodal Gemma 4 model in place for XNNPACK: ``recipe`` (a ``fxport export
    --quant`` name of the xnnpack backend; None: the text decoder stays float32) on the text
    decoder through :class:`TextView`, calibrated on ``tokenizer``'s encoding of the recipe's
    calibration text (no tokenizer: no smoothing, the report says so); with ``encoder_precision``
    "int8" every linear of the towers and their embedders int8 per channel with dynamic int8
    activations (the recipe INT8_PC), with "float" the encoders stay float32.

    Why int8 is the default (bench/multimodal_cpu.py, E2B-width towers, random weights): the int8
    encoders' soft tokens have cosine >= 0.9996 with the float ones, the program is 228 MB smaller
    (491.9 vs 719.5 MB) and one 280-token image encodes faster (2508 vs 3100 ms on 2 threads).
    Raises ValueError (one line) for an unknown precision or recipe."""
    from fxport.lowering.xnnpack_quant import INT8_PC, XnnpackRecipe, quantize_for_xnnpack

    if encoder_precision not in ENCODER_PRECISIONS:
        raise ValueError(f"unknown encoder precision {encoder_precision!r}; choose one of {', '.join(ENCODER_PRECISIONS)}")
    text = quantize_for_xnnpack(TextView(model), recipe, tokenizer=tokenizer) if recipe else None
    encoders = {}
    if encoder_precision == "int8":
        spec = XnnpackRecipe("encoders-int8", ((r".*", INT8_PC),))
        for name in ENCODER_MODULES:
            module = getattr(model.model, name, None)
            if module is not None:
                r = quantize_for_xnnpack(module, spec)
                encoders[name] = (len(r.quantized), len(r.kept_float))
    return MultimodalQuantReport(text, encoder_precision, encoders)


def is_multimodal_checkpoint(path) -> bool:
    """Whether ``path`` is a Hugging Face Gemma 4 directory whose ``config.json`` has a vision or
    audio config (``fxport export`` then writes the multimodal program unless told ``--text-only``)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "gemma4" and bool(cfg.get("vision_config") or cfg.get("audio_config"))


MULTIMODAL_STAGES = ("load", "quantize", "export", "passes", "lower", "serialize", "save")


def build_multimodal(source, out, options=None, *, max_soft_tokens: int = 280, max_audio_frames: int | None = None,
                     encoder_precision: str | None = None, progress: bool = False, on_stage=None):
    """Build the runner-layout program (module docstring) for ``source`` and publish it at ``out``
    with its weights file and tokenizer folder, as :func:`fxport.builder.build` publishes a text
    program. Returns a :class:`fxport.builder.BuildResult` (``metadata``: the constant methods;
    ``report``: the delegation report; ``pass_results`` per method).

    source: :class:`fxport.builder.Source` with ``hf`` (a Gemma 4 directory with a vision / audio
    config) or ``model`` (a :class:`~fxport.models.gemma4.multimodal.Gemma4ForConditionalGeneration`).
    options: :class:`fxport.builder.BuildOptions`; ``max_prefill_chunk`` is raised to
    ``max_soft_tokens + 2`` when smaller (one image is one text_decoder call: the runner does not
    chunk); ``max_seq_len`` is the context; ``quant``: a CPU recipe of the text build on the
    text decoder (:func:`quantize_multimodal`, calibrated with the checkpoint's tokenizer).
    encoder_precision: "int8" or "float" (None: "int8" with ``quant``, else "float", so a build
    without either is the float32 program). Refused (one line): another backend, ``verify``,
    ``dry_run``, a preset / GGUF source, ``layers``, an unknown precision.
    """
    from fxport.builder import BuildError, BuildOptions, BuildResult, StageTimes, fill_tokenizer_dir, tokenizer_sidecar
    from fxport.builder import validate as validate_build

    options = options or BuildOptions()
    if source.preset is not None or source.gguf is not None:
        raise BuildError(f"a multimodal program is built from --hf DIR (a Gemma 4 checkpoint with a vision / audio "
                         f"config), not from {source.describe()}; drop --multimodal")
    refused = [name for name, on in (("--backend " + options.backend, options.backend != "xnnpack"),
                                     ("--verify-method", options.verify),
                                     ("--dry-run", options.dry_run), ("--layers", bool(source.layers))) if on]
    if refused:
        raise BuildError(f"a multimodal program is built for XNNPACK: {', '.join(refused)} is not "
                         "supported with it; drop it, or pass --text-only for the text decoder alone")
    if source.hf is not None and not is_multimodal_checkpoint(source.hf):
        raise BuildError(f"{source.hf} has no vision or audio config (not a Gemma 4 multimodal checkpoint); "
                         "drop --multimodal to export its text decoder")
    if max_soft_tokens < 1:
        raise BuildError(f"--max-soft-tokens {max_soft_tokens} must be positive")
    if encoder_precision is None:
        encoder_precision = "int8" if options.quant else "float"
    if encoder_precision not in ENCODER_PRECISIONS:
        raise BuildError(f"--encoder-precision {encoder_precision} is not one of {', '.join(ENCODER_PRECISIONS)}")
    validate_build(out, options)
    quantized = bool(options.quant) or encoder_precision != "float"
    times = StageTimes(tuple(s for s in MULTIMODAL_STAGES if s != "quantize" or quantized), progress=progress,
                       on_stage=on_stage)
    times.start("load")
    if source.model is not None:
        model, tokenizer = source.model, source.tokenizer
    else:
        from fxport.models.gemma4.multimodal import load_hf_multimodal
        from fxport.models.gemma4.tokenizer import load_tokenizer

        model = load_hf_multimodal(source.hf, max_seq_len=options.max_seq_len)
        try:
            tokenizer = load_tokenizer(source.hf)
        except Exception:  # a checkpoint without a usable tokenizer still exports
            tokenizer = None
    cfg = model.config
    if cfg.vision is None and cfg.audio is None:
        raise BuildError(f"{source.describe()} has no vision or audio tower; export it without --multimodal")
    quant_report = None
    if quantized:
        times.start("quantize")
        quant_report = quantize_multimodal(model, options.quant, tokenizer=tokenizer, encoder_precision=encoder_precision)
    chunk = options.max_prefill_chunk
    if cfg.vision is not None:
        chunk = max(chunk, max_soft_tokens + 2)
    if chunk > model.max_seq_len:
        raise BuildError(f"an image of --max-soft-tokens {max_soft_tokens} needs {chunk} positions in one call, more than "
                         f"--max-seq-len {model.max_seq_len}; raise --max-seq-len or lower --max-soft-tokens")
    extra_eos = list(getattr(tokenizer, "eos_ids", ()) or ()) if tokenizer is not None else []
    lowered = export_runner_multimodal_pte(
        model, None, max_prefill_chunk=chunk, max_soft_tokens=max_soft_tokens, max_audio_frames=max_audio_frames,
        ring_size=options.ring_size, dump=options.dump, speedups=options.speedups, extra_eos=extra_eos,
        on_stage=lambda name: times.start(name) if name in MULTIMODAL_STAGES else None)
    times.start("save")
    fill = None if tokenizer is None else (lambda d: fill_tokenizer_dir(tokenizer, d))
    extra = lowered.write(out, sidecar=tokenizer_sidecar(out), fill_sidecar=fill)
    times.close()
    from pathlib import Path

    return BuildResult(Path(out), options, times, pass_results=lowered.pass_results, report=lowered.report,
                       extra_files=extra, metadata=lowered.metadata,
                       tokenizer_dir=tokenizer_sidecar(out) if tokenizer is not None else None, model=model,
                       quant_report=quant_report)


def describe_methods(metadata: dict, methods) -> str:
    """One line per method the runner-layout program holds (what ``fxport export`` prints)."""
    c = metadata
    E, C = c[contract.EMBEDDING_DIM], c[contract.MAX_SEQ_LEN]
    lines = [f"{contract.TOKEN_EMBEDDING}: tokens int64 (1, T<={C}) -> (1, T, {E}) embedding columns",
             f"{contract.TEXT_DECODER}: (1, T<={C}, {E}) + cache_position (T,) -> "
             f"logits (1, 1, {c.get(contract.VOCAB_SIZE)})"]
    if contract.VISION_ENCODER in methods:
        side = c[contract.PATCH_SIZE] * c[contract.POOLING_KERNEL_SIZE]
        lines.append(f"{contract.VISION_ENCODER}: image uint8 (3, H, W), H and W multiples of {side} px up to "
                     f"{c[contract.MAX_IMAGE_CELLS]} cells (resize to <= {c[contract.MAX_SOFT_TOKENS]} soft tokens) "
                     f"-> (1, cells + 2, {E})")
    if contract.AUDIO_ENCODER in methods:
        from fxport.models.gemma4.runner_methods import MIN_AUDIO_FRAMES

        lines.append(f"{contract.AUDIO_ENCODER}: log-mel float32 (1, F, n_mels), F in [{MIN_AUDIO_FRAMES}, "
                     f"{c[contract.MAX_AUDIO_FRAMES]}] real frames -> (1, ceil(F / 4) + 2, {E})")
    return "\n".join(["methods (ExecuTorch MultimodalRunner layout):"] + ["  " + line for line in lines])
