"""The program contract: what ExecuTorch's LLM runner reads from a ``.pte``, written once.

Every program fxport writes (XNNPACK and CUDA, fxport's own models and foreign graphs) follows
ExecuTorch 1.5.1's ``extension/llm/runner`` (``TextLLMRunner``: ``llm_runner_helper.cpp``,
``text_prefiller.cpp``, ``text_decoder_runner.cpp``, ``io_manager.h``), and fxport's own runtime
(:class:`fxport.runtime.pte_backend.PteBackend`) reads the same names with the same meaning:

methods
    ``prefill`` (the runner's ``forward`` when there is none), and ``decode`` when the program has
    a separate one-token method (CUDA: its kernels differ per method). Exactly two inputs: tokens
    int64 ``(1, T)`` and ``cache_position`` int64 ``(T,)`` (the runner passes ``start_pos (1,)``
    instead when input 1 has one element); one output, logits float ``(1, V)`` or ``(1, T', V)``
    (the runner reads the last row). ``prefill`` accepts any ``T`` in ``1..get_max_seq_len``.
constant methods (scalars unless said)
    ``get_max_seq_len``        the largest ``T`` one call accepts (the prefill chunk). Required.
    ``get_max_context_len``    KV positions: a prompt plus its generation fits below it.
    ``use_kv_cache``           1: the program keeps its own KV cache between calls.
    ``use_sdpa_with_kv_cache`` 1 when the program calls ``llama::custom_sdpa`` (see kernels
                               below), else 0; informational: the 1.5.1 runner does not read it.
    ``enable_dynamic_shape``   1: a prompt goes in chunks of up to ``get_max_seq_len`` tokens
                               (0 would make the runner feed it one token per call).
    ``get_eos_ids``            list of ids that end generation (``<eos>``, ``<end_of_turn>``).
    ``get_vocab_size``, ``get_bos_id``   read by fxport's runtime; the runner takes both from the
                               tokenizer file.
    ``get_activation_dtype``   ExecuTorch ``ScalarType`` of the logits / activations.
    ``get_logits_to_keep_mode`` 0 full (``(1, T, V)``), 1 last (``(1, 1, V)``).
tokenizer
    ``tokenizer.json`` in the program's tokenizer folder. Its post-processor prepends BOS;
    ExecuTorch's ``HFTokenizer`` runs it only when the runner asks for BOS
    (``GenerationConfig(num_bos=1)``), and then the prompt ids equal ``fxport run``'s.

kernels
    XNNPACK programs may call ExecuTorch's ``llama::custom_sdpa`` for causal KV-cache attention
    as ``fxport export`` builds them by default (:class:`fxport.passes.xnnpack.CustomSDPA`; not with
    ``--no-custom-sdpa``).
    Its kernel is in ExecuTorch's LLM custom ops (``extension/llm/custom_ops``): linked into
    ``llama_main`` and the Android / iOS LLM apps; in Python, :func:`load_llm_kernels` registers
    them (the wheel's ``libcustom_ops_aot_lib``) before a program is loaded.

Programs written before this contract (constant method ``get_max_prefill_chunk``, no
``get_max_context_len``) are refused with :data:`REEXPORT_HINT`.

Multimodal programs follow ExecuTorch's ``MultimodalRunner`` (``multimodal_prefiller.cpp``,
``multimodal_decoder_runner.h``): methods :data:`TOKEN_EMBEDDING`, :data:`TEXT_DECODER`,
:data:`VISION_ENCODER`, :data:`AUDIO_ENCODER`, the same constant methods, and fxport's
:data:`MULTIMODAL_CONSTANTS`; the layout (embedding columns, shapes) is stated in
``fxport.builder.multimodal``; :func:`multimodal_problems` checks it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

PREFILL, DECODE, FORWARD = "prefill", "decode", "forward"
# speculative decoding's verify method (opt-in): the two inputs above, the logits of every token
VERIFY = "target_verify"

MAX_SEQ_LEN = "get_max_seq_len"
MAX_CONTEXT_LEN = "get_max_context_len"
USE_KV_CACHE = "use_kv_cache"
USE_SDPA_WITH_KV_CACHE = "use_sdpa_with_kv_cache"
ENABLE_DYNAMIC_SHAPE = "enable_dynamic_shape"
EOS_IDS = "get_eos_ids"
VOCAB_SIZE = "get_vocab_size"
BOS_ID = "get_bos_id"
ACTIVATION_DTYPE = "get_activation_dtype"
LOGITS_TO_KEEP_MODE = "get_logits_to_keep_mode"

# What a reader of a program asks for (fxport's runtime and ``fxport dump``), in this order.
CONSTANT_METHODS = (MAX_SEQ_LEN, MAX_CONTEXT_LEN, USE_KV_CACHE, USE_SDPA_WITH_KV_CACHE, ENABLE_DYNAMIC_SHAPE,
                    EOS_IDS, VOCAB_SIZE, BOS_ID, ACTIVATION_DTYPE, LOGITS_TO_KEEP_MODE)
REQUIRED = (MAX_SEQ_LEN, MAX_CONTEXT_LEN, USE_KV_CACHE, ENABLE_DYNAMIC_SHAPE, EOS_IDS)

LOGITS_TO_KEEP_MODES = {"full": 0, "last": 1}
# ExecuTorch's ScalarType numbering (c10's): the value ``get_activation_dtype`` holds.
SCALAR_TYPES = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}

# ExecuTorch's ScalarType numbers -> torch dtypes (a runtime's method metadata reports the numbers).
_FROM_SCALAR_TYPE = {3: torch.int32, 4: torch.long, **{v: k for k, v in SCALAR_TYPES.items()}}

# The multimodal layout of ExecuTorch's ``MultimodalRunner`` (``extension/llm/runner/constants.h``):
# a prompt is prefilled segment by segment, each segment's (1, n, E) embeddings in one text_decoder
# call; the column layout and shapes are fxport.models.gemma4.runner_methods' (and
# fxport.builder.multimodal's) docstring.
TOKEN_EMBEDDING, TEXT_DECODER = "token_embedding", "text_decoder"
VISION_ENCODER, AUDIO_ENCODER = "vision_encoder", "audio_encoder"
MULTIMODAL_METHODS = (TOKEN_EMBEDDING, TEXT_DECODER, VISION_ENCODER, AUDIO_ENCODER)
# Constant methods of a multimodal program beyond CONSTANT_METHODS (fxport's runtime reads them;
# the stock runner reads none of them).
HIDDEN_SIZE = "get_hidden_size"                 # H: embedding columns [0, H)
PER_LAYER_COLUMNS = "get_per_layer_columns"     # NL * P: per-layer identity columns [H, H + NL * P)
EMBEDDING_DIM = "get_embedding_dim"             # E = H + NL * P + 1 (the last column: vision flag)
BIDIRECTIONAL_VISION = "get_use_bidirectional_vision"
IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID = "get_image_token_id", "get_boi_token_id", "get_eoi_token_id"
PATCH_SIZE, POOLING_KERNEL_SIZE = "get_patch_size", "get_pooling_kernel_size"
MAX_SOFT_TOKENS = "get_max_soft_tokens"         # the resize budget (soft tokens per image)
MAX_IMAGE_CELLS = "get_max_image_cells"         # the most pooled cells per image side
AUDIO_TOKEN_ID, BOA_TOKEN_ID, EOA_TOKEN_ID = "get_audio_token_id", "get_boa_token_id", "get_eoa_token_id"
MAX_AUDIO_FRAMES = "get_max_audio_frames"
MULTIMODAL_CONSTANTS = (HIDDEN_SIZE, PER_LAYER_COLUMNS, EMBEDDING_DIM, BIDIRECTIONAL_VISION, IMAGE_TOKEN_ID,
                        BOI_TOKEN_ID, EOI_TOKEN_ID, PATCH_SIZE, POOLING_KERNEL_SIZE, MAX_SOFT_TOKENS,
                        MAX_IMAGE_CELLS, AUDIO_TOKEN_ID, BOA_TOKEN_ID, EOA_TOKEN_ID, MAX_AUDIO_FRAMES)

# The constant method only programs from before the contract have.
LEGACY_MARKER = "get_max_prefill_chunk"
REEXPORT_HINT = ("was written by an older fxport (before ExecuTorch's LLM-runner contract: no "
                 "get_max_context_len); re-export it with `fxport export` (or `make demo`)")


def load_llm_kernels() -> None:
    """Register, once per process, the kernels fxport's CPU programs call outside XNNPACK:
    ExecuTorch's quantized ops (``quantized_decomposed::embedding_byte`` ..., the ``balanced``
    lookup; ``executorch.kernels.quantized``) and its LLM custom ops (``llama::custom_sdpa`` ...).

    A program that calls them fails to load its method without them ("Missing operator"). The
    wheel ships the LLM ops in ``executorch/extension/llm/custom_ops/libcustom_ops_aot_lib``;
    loading it registers the ExecuTorch kernels (for the runtime and the LLM runner's bindings)
    and the torch ops. Raises ImportError naming the file when the wheel lacks it.
    """
    global _LLM_KERNELS_LOADED
    if _LLM_KERNELS_LOADED:
        return
    import importlib.util
    from pathlib import Path

    import executorch.kernels.quantized  # noqa: F401  (registers the quantized ops' kernels)

    spec = importlib.util.find_spec("executorch.extension.llm.custom_ops")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    libs = sorted(p for d in folders for p in Path(d).glob("libcustom_ops_aot_lib.*"))
    if not libs:
        raise ImportError("ExecuTorch's LLM custom ops (executorch/extension/llm/custom_ops/libcustom_ops_aot_lib.so) "
                          "are not installed; reinstall executorch==1.5.1, or re-export with --no-custom-sdpa")
    from executorch.extension.pybindings import portable_lib  # noqa: F401  (the runtime the kernels register into)

    if not hasattr(torch.ops.llama, "custom_sdpa"):
        torch.ops.load_library(str(libs[0]))
    _LLM_KERNELS_LOADED = True


_LLM_KERNELS_LOADED = False


class ContractError(ValueError):
    """Metadata that cannot describe a runnable program; the message names the value."""


def runner_metadata(*, max_prefill_chunk: int, max_context_len: int, eos_ids: Iterable[int],
                    vocab_size: int | None = None, bos_id: int | None = None,
                    logits: str = "last", activation_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The constant methods of a text program (``to_edge(..., constant_methods=...)``).

    max_prefill_chunk: the largest ``T`` a ``prefill`` call accepts (``get_max_seq_len``).
    max_context_len: KV positions (``get_max_context_len``); at least ``max_prefill_chunk``.
    logits: ``"last"`` (prefill returns ``(1, 1, V)``) or ``"full"`` (``(1, T, V)``).
    """
    chunk, context = int(max_prefill_chunk), int(max_context_len)
    if chunk < 1:
        raise ContractError(f"max_prefill_chunk {chunk}: a prefill call must accept at least 1 token")
    if context < chunk:
        raise ContractError(f"max_context_len {context} < max_prefill_chunk {chunk}: a chunk cannot hold "
                            "more tokens than the KV cache has positions; lower the chunk")
    eos = [int(i) for i in dict.fromkeys(eos_ids)]
    if not eos:
        raise ContractError("no end-of-sequence id: the runner needs get_eos_ids to stop generating")
    if logits not in LOGITS_TO_KEEP_MODES:
        raise ContractError(f"logits {logits!r}: choose one of {sorted(LOGITS_TO_KEEP_MODES)}")
    if activation_dtype not in SCALAR_TYPES:
        raise ContractError(f"activation dtype {activation_dtype}: choose one of {sorted(map(str, SCALAR_TYPES))}")
    meta: dict[str, Any] = {
        MAX_SEQ_LEN: chunk,
        MAX_CONTEXT_LEN: context,
        USE_KV_CACHE: 1,
        USE_SDPA_WITH_KV_CACHE: 0,
        ENABLE_DYNAMIC_SHAPE: 1,
        EOS_IDS: eos,
        ACTIVATION_DTYPE: SCALAR_TYPES[activation_dtype],
        LOGITS_TO_KEEP_MODE: LOGITS_TO_KEEP_MODES[logits],
    }
    if vocab_size is not None:
        meta[VOCAB_SIZE] = int(vocab_size)
    if bos_id is not None:
        meta[BOS_ID] = int(bos_id)
    return meta


def text_method(method_names: Iterable[str]) -> str | None:
    """The method the runner prefills with: ``forward`` when present, else ``prefill``."""
    names = set(method_names)
    return FORWARD if FORWARD in names else PREFILL if PREFILL in names else None


def contract_problems(method_names: Iterable[str], constants: Mapping[str, Any],
                      inputs: Mapping[str, Sequence[tuple[torch.dtype, Sequence[int]]]],
                      outputs: Mapping[str, Sequence[tuple[torch.dtype, Sequence[int]]]] | None = None) -> list[str]:
    """What keeps ExecuTorch's ``TextLLMRunner`` from running a program; ``[]`` when nothing does.

    method_names: every method of the program (constant methods included).
    constants: ``{constant method: value}`` as stored (``to_edge``'s ``constant_methods``).
    inputs / outputs: ``{method: [(dtype, max sizes), ...]}`` of the text methods (a torch dtype
        or ExecuTorch's ScalarType number, as ``MethodMeta`` reports it).
    """
    names = set(method_names)
    if TEXT_DECODER in names or TOKEN_EMBEDDING in names:
        return multimodal_problems(names, constants, inputs, outputs)
    problems = []
    main = text_method(names)
    if main is None:
        return [f"no 'forward' or 'prefill' method (methods: {sorted(names)})"]
    if LEGACY_MARKER in names and MAX_CONTEXT_LEN not in names:
        return [f"program {REEXPORT_HINT}"]
    for key in REQUIRED:
        if key not in names:
            problems.append(f"constant method {key} is missing")
    for method in [m for m in (main, DECODE) if m in names]:
        ins = list(inputs.get(method, ()))
        if len(ins) != 2:
            problems.append(f"{method} takes {len(ins)} inputs; the runner passes exactly 2 (tokens, cache_position)")
            continue
        (tok_dtype, tok_sizes), (pos_dtype, pos_sizes) = ins
        tok_dtype, pos_dtype = (_FROM_SCALAR_TYPE.get(d, d) for d in (tok_dtype, pos_dtype))
        if tok_dtype != torch.long or len(tok_sizes) != 2 or tok_sizes[0] != 1:
            problems.append(f"{method} input 0 is {tok_dtype} {tuple(tok_sizes)}; the runner passes int64 (1, T) tokens")
        if pos_dtype != torch.long or len(pos_sizes) != 1:
            problems.append(f"{method} input 1 is {pos_dtype} {tuple(pos_sizes)}; the runner passes int64 (T,) positions")
        if outputs is not None and len(outputs.get(method, ())) != 1:
            problems.append(f"{method} returns {len(outputs.get(method, ()))} outputs; the runner reads exactly 1 (logits)")
    chunk = constants.get(MAX_SEQ_LEN)
    if main in inputs and len(inputs[main]) == 2 and chunk is not None:
        accepted = int(inputs[main][0][1][-1])
        if int(chunk) > accepted:
            problems.append(f"{MAX_SEQ_LEN} = {chunk} but {main} accepts at most {accepted} tokens per call; "
                            f"{MAX_SEQ_LEN} must be the largest prefill chunk")
        if int(chunk) > 1 and not constants.get(ENABLE_DYNAMIC_SHAPE):
            problems.append(f"{ENABLE_DYNAMIC_SHAPE} is not set: the runner would feed the prompt one token per call")
    context = constants.get(MAX_CONTEXT_LEN)
    if context is not None and chunk is not None and int(context) < int(chunk):
        problems.append(f"{MAX_CONTEXT_LEN} = {context} is below {MAX_SEQ_LEN} = {chunk}")
    return problems


def multimodal_problems(method_names: Iterable[str], constants: Mapping[str, Any],
                        inputs: Mapping[str, Sequence[tuple[torch.dtype, Sequence[int]]]],
                        outputs: Mapping[str, Sequence[tuple[torch.dtype, Sequence[int]]]] | None = None) -> list[str]:
    """What keeps ExecuTorch's stock ``MultimodalRunner`` from running a program; ``[]`` when
    nothing does (``multimodal_prefiller.cpp`` / ``multimodal_decoder_runner.h``: token_embedding
    of (1, T) int64 ids, text_decoder of (embeddings, cache_position), one tensor per encoder).
    Methods missing from ``inputs`` are checked by name only."""
    names = set(method_names)
    problems = [f"method {m} is missing (the runner loads it)" for m in (TOKEN_EMBEDDING, TEXT_DECODER) if m not in names]
    problems += [f"constant method {key} is missing" for key in (MAX_SEQ_LEN, MAX_CONTEXT_LEN) if key not in names]
    dtype = lambda d: _FROM_SCALAR_TYPE.get(d, d)  # noqa: E731
    if TOKEN_EMBEDDING in inputs:
        ins = list(inputs[TOKEN_EMBEDDING])
        if len(ins) != 1 or dtype(ins[0][0]) != torch.long or len(ins[0][1]) != 2 or ins[0][1][0] != 1:
            problems.append(f"{TOKEN_EMBEDDING} takes {[(str(dtype(d)), tuple(z)) for d, z in ins]}; the runner passes "
                            "one int64 (1, T) token tensor")
    if TEXT_DECODER in inputs:
        ins = list(inputs[TEXT_DECODER])
        if len(ins) != 2 or len(ins[0][1]) != 3 or dtype(ins[1][0]) != torch.long or len(ins[1][1]) != 1:
            problems.append(f"{TEXT_DECODER} takes {[(str(dtype(d)), tuple(z)) for d, z in ins]}; the runner passes "
                            "(embeddings (1, T, E), cache_position int64 (T,))")
        if outputs is not None and TEXT_DECODER in outputs and len(outputs[TEXT_DECODER]) != 1:
            problems.append(f"{TEXT_DECODER} returns {len(outputs[TEXT_DECODER])} outputs; "
                            "the runner reads exactly 1 (logits)")
    for method in (VISION_ENCODER, AUDIO_ENCODER):
        if method in inputs and len(list(inputs[method])) != 1:
            problems.append(f"{method} takes {len(list(inputs[method]))} inputs; the runner passes exactly 1")
    return problems
