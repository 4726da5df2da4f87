"""The one build pipeline: a model source and options -> a written program, in named stages.

    load -> quantize -> export -> passes -> lower -> serialize -> save

``build(source, out, options)`` is what ``fxport export``, ``fxport demo`` and every bench
script that writes a program call. Each stage is timed (:class:`StageTimes`, printed as a
table) and drives an optional progress bar on stderr.

Everything a user can get wrong is checked *before* any work (:func:`validate`): the backend
name, the backend's own options (its module owns its recipe vocabulary: ``validate(options)``
in :mod:`fxport.lowering.xnnpack` / :mod:`fxport.lowering.cuda`), the sizes, and the output
path (a directory, a read-only directory, a path through a file). Those errors are
:class:`BuildError` (a ``ValueError``) with one line naming the input and the fix.

The program is written atomically (:mod:`fxport.fileio`: a temporary file in the same
directory, fsync, rename), so a failed or killed build leaves the previous file intact. With
``reuse=True`` a build whose inputs (source digest, backend, recipe, options, fxport version and
source digest) equal those recorded in the manifest beside the program (``model.pte.build.json``)
is skipped and the existing program returned.

Compile time (the 270M ``balanced`` export: 223 s -> 53-60 s on 2 cores): the stages run with the
collector paused between stage boundaries (:class:`StageGC`) and under the compile-time patches
of :mod:`fxport.builder.speedups` (each probed first, with ExecuTorch's plain path when an
upstream name changed). One switch, ``BuildOptions(speedups=False)`` / ``fxport export
--no-speedups``, turns all of them off. None changes the program: the bytes written are the same
with and without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fxport.contract import USE_SDPA_WITH_KV_CACHE, VERIFY

STAGES = ("load", "quantize", "export", "passes", "lower", "serialize", "save")
BACKENDS = {"xnnpack": "fxport.lowering.xnnpack", "cuda": "fxport.lowering.cuda"}
MANIFEST_SUFFIX = ".build.json"


class BuildError(ValueError):
    """A bad build input (option, source, output path); the message is one line with the fix."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """Where the model comes from: exactly one of ``preset``, ``gguf``, ``hf`` or ``model``.

    preset: a built-in config with random weights (``seed``);
    gguf / hf: a checkpoint file / Hugging Face directory (its tokenizer comes along);
    model: an already-built eager model (``tokenizer`` optional); it is quantized in place.
    ``layers``: keep the first N layers of a preset or checkpoint (quick trials and tests).
    """

    preset: str | None = None
    gguf: Path | None = None
    hf: Path | None = None
    model: Any = None
    tokenizer: Any = None
    seed: int = 0
    layers: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("preset", "gguf", "hf", "model") if getattr(self, k) is not None]
        if len(given) != 1:
            raise BuildError(f"give exactly one model source (preset, gguf, hf or model); got {given or 'none'}")

    def describe(self) -> str:
        if self.preset is not None:
            return f"preset {self.preset}" + (f" ({self.layers} layers)" if self.layers else "")
        if self.model is not None:
            return f"eager {type(self.model).__name__}"
        return str(self.gguf or self.hf)

    def digest(self) -> dict[str, Any]:
        """What identifies this source's weights, for the reuse decision."""
        if self.preset is not None:
            return {"preset": self.preset, "seed": self.seed, "layers": self.layers}
        cut = {"layers": self.layers} if self.layers else {}  # (absent for a whole checkpoint: older manifests match)
        if self.gguf is not None:
            return {"gguf_sha256": file_sha256(Path(self.gguf)), **cut}
        if self.hf is not None:
            files = sorted(p for p in Path(self.hf).iterdir() if p.is_file())
            return {"hf": {p.name: file_sha256(p) for p in files}, **cut}
        raise BuildError("an eager model source has no digest; reuse needs a preset, gguf or hf source")


@dataclass(frozen=True)
class BuildOptions:
    """What to build. ``quant``: a recipe name of the backend (None: float32)."""

    backend: str = "xnnpack"
    quant: str | None = None
    max_seq_len: int = 1024
    max_prefill_chunk: int = 128
    ring_size: int | None = None
    dump: str | None = None
    dry_run: bool = False  # cuda: partition and report only (no GPU needed), nothing written
    # xnnpack: add the ``target_verify`` method (every token's logits, prefill's KV buffers) that
    # speculative decoding runs (fxport.runtime.speculative); off: the program is unchanged
    verify: bool = False
    # the compile-time patches of fxport.builder.speedups (and the paused collector): the same
    # program either way, ~4x faster with them
    speedups: bool = True
    # xnnpack: causal KV-cache attention through ExecuTorch's llama::custom_sdpa kernel
    # (fxport.passes.xnnpack.CustomSDPA: faster decode and prefill; the runner links ExecuTorch's
    # LLM custom ops, as llama_main does; a native one wants OMP_NUM_THREADS=1). None (default):
    # on for xnnpack, off for other backends; False: attention stays in XNNPACK over the whole cache
    custom_sdpa: bool | None = None

    def __post_init__(self) -> None:
        if self.custom_sdpa and self.backend != "xnnpack":
            raise ValueError(f"custom_sdpa is an xnnpack option; --backend {self.backend} has its own attention "
                             "(drop --custom-sdpa)")
        if self.custom_sdpa is None:
            object.__setattr__(self, "custom_sdpa", self.backend == "xnnpack")

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dump")
        d.pop("speedups")  # the same bytes either way: not an input of the program
        if not d["verify"]:  # the manifests of programs built before the option still match
            d.pop("verify")
        return d


# ----------------------------------------------------------------------------- stage times


class StageTimes:
    """Wall and CPU time per stage, in order; ``table()`` prints them with the load average.

    CPU seconds (``time.process_time``: every thread of this process) are what the stage costs
    whatever the machine's load; on a loaded machine wall time is inflated by waiting for a core.
    """

    def __init__(self, stages: tuple[str, ...] = STAGES, progress: bool = False,
                 on_stage: Callable[[str], None] | None = None):
        self.order = list(stages)
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._current: str | None = None
        self._t0 = 0.0
        self._c0 = 0.0
        self._on_stage = on_stage
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.order), desc="build", unit="stage", file=sys.stderr, leave=False)

    def start(self, name: str) -> None:
        if name not in self.order:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(self.order)}")
        self.stop()
        self._current, self._t0, self._c0 = name, time.perf_counter(), time.process_time()
        if self._bar is not None:
            self._bar.set_description(name)
        if self._on_stage is not None:
            self._on_stage(name)

    def stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + time.perf_counter() - self._t0
            self.cpu_seconds[self._current] = (self.cpu_seconds.get(self._current, 0.0)
                                               + time.process_time() - self._c0)
            self._current = None
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        self.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_seconds.values())

    def table(self, title: str = "stage times") -> str:
        load = os.getloadavg()
        rows = [f"{title} (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores)",
                f"  {'stage':<10} {'wall s':>8} {'cpu s':>8}"]
        rows += [f"  {name:<10} {self.seconds[name]:>8.1f} {self.cpu_seconds.get(name, 0.0):>8.1f}"
                 for name in self.order if name in self.seconds]
        rows.append(f"  {'total':<10} {self.total:>8.1f} {self.cpu_total:>8.1f}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- result


@dataclass
class BuildResult:
    """What :func:`build` did. ``out`` is None for a dry run (nothing written)."""

    out: Path | None
    options: BuildOptions
    times: StageTimes
    reused: bool = False
    reuse_reason: str = ""
    quant_report: Any = None
    pass_results: dict = field(default_factory=dict)
    report: Any = None  # the backend's delegation / dry-run report
    extra_files: list[Path] = field(default_factory=list)  # e.g. CUDA's .ptd
    metadata: dict[str, int] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    model: Any = None  # the (quantized) eager model, when the build loaded one
    # speedups that were off ({name: probe mismatch}) and what the lowering skipped; {} when switched off
    speedups: dict = field(default_factory=dict)

    @property
    def path(self) -> Path | None:  # the name ``export_model``'s report used
        return self.out

    def summary(self) -> str:
        lines = []
        if self.out is not None:
            verb = "reused" if self.reused else "wrote"
            lines.append(f"{verb} {self.out} ({self.out.stat().st_size / 2**20:.1f} MiB)")
        lines += [f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in self.extra_files]
        if self.quant_report is not None and hasattr(self.quant_report, "summary"):
            lines.append(self.quant_report.summary())
        for method, res in self.pass_results.items():
            lines.extend(f"[{method}] {line}" for line in res.summary().splitlines())
        if self.report is not None:
            lines.append(self.report.summary())
        return "\n".join(lines)


# ----------------------------------------------------------------------------- validation


def backend_module(name: str):
    """The lowering module of backend ``name`` (imported lazily), a
    :class:`fxport.lowering.backend.Backend`."""
    import importlib

    from fxport.lowering.backend import Backend

    if name not in BACKENDS:
        raise BuildError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    if not isinstance(module, Backend):
        missing = [m for m in ("NAME", "PROGRAM_SUFFIX", "METHODS", "validate", "quantize", "run_passes", "dry_run",
                               "lower") if not hasattr(module, m)]
        raise TypeError(f"{BACKENDS[name]} is not a fxport.lowering.backend.Backend: it lacks {', '.join(missing)}")
    return module


def tokenizer_sidecar(out: str | Path) -> Path:
    """Directory next to ``model.pte`` holding its tokenizer: ``model.tokenizer/``."""
    return Path(out).with_suffix(".tokenizer")


def check_output(out: str | Path, suffix: str = ".pte") -> Path:
    """Refuse an output path that cannot be written, before any work (one-line ValueError).

    ``out`` must end in ``suffix``; :func:`fxport.fileio.check_writable_output` refuses a
    directory, a path through a file and a read-only folder; the tokenizer sidecar path must not
    be a file, the weights file path (``<stem>.ptd``) not a directory.
    """
    from fxport.fileio import check_writable_output, weights_file

    out = Path(out)
    if out.suffix != suffix:
        raise BuildError(f"--out {out} must end in {suffix}")
    check_writable_output(out, what="--out")
    sidecar = tokenizer_sidecar(out)
    if sidecar.exists() and not sidecar.is_dir():
        raise BuildError(f"--out {out}: its tokenizer directory {sidecar} exists as a file; remove it or choose another --out")
    weights = weights_file(out)  # where a program with a weights file writes it (XNNPACK's shared tables)
    if weights.is_dir():
        raise BuildError(f"--out {out}: its weights file {weights} exists as a directory; remove it or choose another --out")
    return out


def validate(out: str | Path | None, options: BuildOptions):
    """Check every option and the output path; returns the backend module. No work is done."""
    backend = backend_module(options.backend)
    if options.max_seq_len < 1 or options.max_prefill_chunk < 1:
        raise BuildError("--max-seq-len and --max-prefill-chunk must be positive")
    if options.max_prefill_chunk > options.max_seq_len:
        raise BuildError(f"--max-prefill-chunk {options.max_prefill_chunk} exceeds --max-seq-len {options.max_seq_len}")
    if options.ring_size is not None and options.ring_size < 1:
        raise BuildError(f"--ring-size {options.ring_size} must be positive")
    if options.verify and options.backend != "xnnpack":
        raise BuildError(f"--verify-method (speculative decoding's target_verify) is built for --backend xnnpack only, "
                         f"not {options.backend}; drop it or use --backend xnnpack")
    backend.validate(options)  # the backend's recipe names and options
    if out is None:
        if not options.dry_run:
            raise BuildError("no output path given; pass --out FILE.pte (or --dry-run)")
        return backend
    check_output(out, backend.PROGRAM_SUFFIX)
    return backend


def check_source(source: Source) -> None:
    """Cheap source checks before loading: the preset exists, ``layers`` fits."""
    if source.preset is not None:
        from fxport.models.gemma4.config import get_preset

        config = get_preset(source.preset)  # ValueError listing the presets
        if source.layers and source.layers > config.num_hidden_layers:
            raise BuildError(f"--layers {source.layers} exceeds the {config.num_hidden_layers} layers of preset "
                             f"{source.preset!r}")
        if source.layers and config.num_kv_shared_layers and not _layers_fit(config, source.layers):
            # its last layers reuse the caches of earlier layers of their type: those must stay in the model
            fits = [n for n in range(1, config.num_hidden_layers + 1) if _layers_fit(config, n)]
            raise BuildError(f"--layers {source.layers}: preset {source.preset!r} shares the KV caches of its last "
                             f"{config.num_kv_shared_layers} layers with earlier layers of their type; pass --layers "
                             f"{' / '.join(map(str, fits[:4]))}{' ...' if len(fits) > 4 else ''}")
    for path, kind in ((source.gguf, "--gguf"), (source.hf, "--hf")):
        if path is not None and not Path(path).exists():
            raise BuildError(f"{kind} {path} does not exist")


def _layers_fit(config: Any, n: int) -> bool:
    """Whether the first ``n`` layers of ``config`` make a valid model (KV sharing included)."""
    try:
        config.replace(num_hidden_layers=n, layer_types=config.layer_types[:n])
    except ValueError:
        return False
    return True


def _check_ring(model: Any, options: BuildOptions) -> None:
    """A ring smaller than window + chunk - 1 corrupts the cache; refuse it before export."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if options.ring_size is None or not window:
        return
    need = window + options.max_prefill_chunk - 1
    if options.ring_size < need:
        raise BuildError(f"--ring-size {options.ring_size} is below window {window} + --max-prefill-chunk "
                         f"{options.max_prefill_chunk} - 1 = {need}; pass --ring-size {need} or more, or a smaller chunk")


# ----------------------------------------------------------------------------- load


def load_source(source: Source, max_seq_len: int, progress: bool = False, meta: bool = False):
    """``(model, tokenizer or None)``; ``meta``: build a preset on the meta device (no weights)."""
    import torch

    if source.model is not None:
        return source.model, source.tokenizer
    if source.preset is not None:
        from fxport.models.gemma4.config import get_preset
        from fxport.models.gemma4.model import Gemma4ForCausalLM

        config = get_preset(source.preset)
        if source.layers:
            config = config.replace(num_hidden_layers=source.layers, layer_types=config.layer_types[:source.layers])
        torch.manual_seed(source.seed)
        if meta:
            with torch.device("meta"):
                return Gemma4ForCausalLM(config, max_seq_len=max_seq_len).eval(), None
        return Gemma4ForCausalLM(config, max_seq_len=max_seq_len).eval(), None
    from fxport.models.gemma4.load import build_model, load_checkpoint
    from fxport.models.gemma4.tokenizer import load_tokenizer

    path = source.gguf or source.hf
    checkpoint = load_checkpoint(path, progress=progress)
    if source.layers:
        checkpoint = _first_layers(checkpoint, source.layers, str(path))
    model, tok_source = build_model(checkpoint, max_seq_len, source=str(path)), checkpoint.tokenizer
    try:
        tokenizer = load_tokenizer(tok_source)
    except Exception:  # a checkpoint without a usable tokenizer still exports
        tokenizer = None
    return model, tokenizer


def _first_layers(checkpoint: Any, n: int, source: str) -> Any:
    """``checkpoint`` cut to its first ``n`` layers (config and weights), for ``Source(layers=n)``."""
    config, state_dict, tokenizer = checkpoint
    if n > config.num_hidden_layers:
        raise BuildError(f"--layers {n} exceeds the {config.num_hidden_layers} layers of {source}")
    if not _layers_fit(config, n):
        raise BuildError(f"--layers {n}: {source} shares the KV caches of its last layers with earlier layers; "
                         "keep more layers")
    config = config.replace(num_hidden_layers=n, layer_types=config.layer_types[:n])
    kept = {k: v for k, v in state_dict.items()
            if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    return type(checkpoint)(config, kept, tokenizer)


def export_programs(model: Any, options: BuildOptions,
                    methods: tuple[str, ...] = ("prefill", "decode")) -> dict[str, Any]:
    """The methods a backend runs (its ``METHODS``: prefill + decode for CUDA, prefill alone for
    XNNPACK) in functional ATen IR (:func:`fxport.models.gemma4.export.export_methods`); the same
    export for every backend (the backends differ from the passes on)."""
    import torch

    from fxport.models.gemma4.export import export_methods

    with torch.no_grad():
        return export_methods(model, max_prefill_chunk=options.max_prefill_chunk, methods=methods)


def sliding_windows(model: Any) -> dict[str, int]:
    """{KV-cache buffer FQN: window} of ``model``'s sliding-window layers (what a backend's
    ring-buffer pass needs; empty for a model that is not fxport's Gemma)."""
    from fxport.models.gemma4.model import sliding_window_buffers

    return sliding_window_buffers(model)


def model_metadata(model: Any, max_prefill_chunk: int, tokenizer: Any = None) -> dict[str, Any]:
    """Constant methods stored in the program: ExecuTorch's LLM-runner contract
    (:func:`fxport.contract.runner_metadata`), read by the stock runner and by
    ``runtime.pte_backend.PteBackend`` alike.

    ``get_max_seq_len`` is the prefill chunk and ``get_max_context_len`` the KV positions
    (``model.max_seq_len``); the end-of-sequence ids are the config's and, when given, the
    tokenizer's (``<end_of_turn>``), so both runtimes stop at the same token.
    """
    from fxport.contract import runner_metadata

    cfg = model.config
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
    if tokenizer is not None:
        eos += list(getattr(tokenizer, "eos_ids", ()) or ())
    return runner_metadata(max_prefill_chunk=max_prefill_chunk, max_context_len=int(model.max_seq_len),
                           eos_ids=eos, vocab_size=int(cfg.vocab_size), bos_id=int(cfg.bos_token_id),
                           logits="last")


def fill_tokenizer_dir(tokenizer: Any, directory: Path) -> None:
    """Write ``tokenizer`` into ``directory`` as a Hugging Face-style folder ``load_tokenizer`` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer.json")  # ExecuTorch's runner reads this file too
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids), "pad_token_id": tokenizer.pad_id}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": bool(tokenizer.add_bos)}))


# ----------------------------------------------------------------------------- reuse


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_CODE_DIRS = ("builder", "contract.py", "lowering", "passes", "models", "quant", "kernels", "weights")


def code_digest() -> str:
    """sha256 over fxport's program-producing sources (a change there means a new program)."""
    root = Path(__file__).resolve().parent.parent  # the package root (builder/ is one of its folders)
    h = hashlib.sha256()
    for entry in _CODE_DIRS:
        p = root / entry
        files = [p] if p.is_file() else sorted(p.rglob("*.py"))
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def build_inputs(source: Source, options: BuildOptions) -> dict[str, Any]:
    """Everything the program depends on, as recorded in its manifest."""
    import torch

    from fxport import __version__

    try:
        from importlib.metadata import version

        et_version = version("executorch")
    except Exception:
        et_version = None
    import platform

    # python: the default calibration text of smoothing / GPTQ is Python's own documentation
    return {"fxport_version": __version__, "fxport_code": code_digest(), "torch": torch.__version__,
            "executorch": et_version, "python": platform.python_version(), "source": source.digest(),
            "options": options.key()}


def manifest_path(out: str | Path) -> Path:
    return Path(str(out) + MANIFEST_SUFFIX)


def reuse_decision(out: str | Path, inputs: Mapping[str, Any]) -> tuple[bool, str]:
    """``(reusable, reason)``: the program at ``out`` was built from exactly ``inputs`` and is intact."""
    out = Path(out)
    mpath = manifest_path(out)
    if not out.is_file():
        return False, f"{out} does not exist"
    if not mpath.is_file():
        return False, f"no build manifest {mpath.name}"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False, f"build manifest {mpath.name} is unreadable"
    if not isinstance(manifest, dict):
        return False, f"build manifest {mpath.name} is not a JSON object"
    recorded = manifest.get("inputs", {})
    changed = sorted(k for k in set(inputs) | set(recorded) if inputs.get(k) != recorded.get(k))
    if changed:
        return False, "inputs changed: " + ", ".join(changed)
    if out.stat().st_size != manifest.get("size") or file_sha256(out) != manifest.get("sha256"):
        return False, f"{out.name} differs from the program the manifest recorded"
    files = manifest.get("files", {})
    for name, rec in (files.items() if isinstance(files, dict) else ()):
        f = out.parent / name
        if not f.is_file():
            return False, f"{name} (the program's weights) does not exist"
        if not isinstance(rec, dict) or f.stat().st_size != rec.get("size") or file_sha256(f) != rec.get("sha256"):
            return False, f"{name} differs from the weights the manifest recorded"
    return True, f"inputs unchanged since {manifest.get('built_at', 'the last build')}"


def write_manifest(out: Path, inputs: Mapping[str, Any], times: StageTimes, extra: Mapping[str, Any] | None = None,
                   files: Sequence[Path] = ()) -> Path:
    """Record what built ``out`` (``inputs``), its digest and those of ``files`` written with it
    (e.g. its ``.ptd`` weights), so :func:`reuse_decision` can vouch for the set."""
    from fxport import fileio

    data = {"inputs": dict(inputs), "size": out.stat().st_size, "sha256": file_sha256(out),
            "files": {Path(f).name: {"size": Path(f).stat().st_size, "sha256": file_sha256(Path(f))} for f in files},
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "stage_seconds": {k: round(v, 2) for k, v in times.seconds.items()}, **dict(extra or {})}
    path = manifest_path(out)
    fileio.write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
    return path


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest beside ``out`` ({} when there is none or it is unreadable)."""
    try:
        data = json.loads(manifest_path(out).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_manifest(out: str | Path, **entries: Any) -> None:
    """Add ``entries`` to the manifest beside ``out`` (atomically); no-op without a manifest."""
    from fxport import fileio

    data = read_manifest(out)
    if data:
        data.update(entries)
        fileio.write_bytes(manifest_path(out), json.dumps(data, indent=1, sort_keys=True).encode())


# ----------------------------------------------------------------------------- build

class StageGC:
    """Python's cyclic garbage collector paused during a build's stages (load to serialization),
    one full collection at each stage boundary (:meth:`boundary`) and at the end.

    Tracing creates millions of objects that stay alive until their stage ends (nodes, fake
    tensors, symbolic expressions); the collector's automatic full collections walk all of them
    again and again and find little to free: in the 270M build, 16 full collections took 4.3 s.
    One collection per stage frees what the stage left behind (the same peak memory, 3.7 GB).
    A collector the caller had disabled stays disabled (and nothing is collected); ``on=False``
    (``BuildOptions(speedups=False)``) leaves the collector alone."""

    def __init__(self, on: bool = True) -> None:
        self._on = on
        self._enabled = False

    def __enter__(self) -> "StageGC":
        import gc

        self._enabled = self._on and gc.isenabled()
        if self._enabled:
            gc.disable()
        return self

    def boundary(self) -> None:
        """A full collection, if this context paused the collector."""
        import gc

        if self._enabled:
            gc.collect()

    def __exit__(self, *exc) -> None:
        import gc

        if self._enabled:
            self.boundary()
            gc.enable()


# Which backend calls run under the lowering speedups (fewer_retraces, faster_partitioner): where
# the same bytes / the same report were checked. CUDA's AOTInductor lowering runs plain.
LOWERING_SPEEDUPS = {"xnnpack": ("lower",), "cuda": ("dry_run",)}


def build(source: Source, out: str | Path | None, options: BuildOptions = BuildOptions(), *,
          progress: bool = False, on_stage: Callable[[str], None] | None = None,
          reuse: bool = False) -> BuildResult:
    """Build the program for ``source`` with ``options`` and write it to ``out``.

    Raises :class:`BuildError` (one line) for a bad option or output path before any work.
    ``on_stage(name)`` is called as each stage starts; ``progress`` shows a bar on stderr.
    ``reuse``: when ``out`` and its manifest record the same inputs, return it unbuilt
    (``result.reused``); a build with ``reuse`` records its inputs in the manifest. The CUDA dry run (``options.dry_run``) writes nothing: ``result.report``
    is its partition report.
    """
    backend = validate(out, options)
    check_source(source)
    inputs = None
    if reuse and out is not None and not options.dry_run:
        inputs = build_inputs(source, options)
        ok, reason = reuse_decision(out, inputs)
        if ok:
            times = StageTimes(())
            sidecar = tokenizer_sidecar(out)
            files = [Path(out).parent / name for name in read_manifest(out).get("files", {})]
            return BuildResult(Path(out), options, times, reused=True, reuse_reason=reason,
                               tokenizer_dir=sidecar if sidecar.is_dir() else None, extra_files=files)

    stages = tuple(s for s in STAGES if not (s == "quantize" and not options.quant)
                   and not (options.dry_run and s in ("serialize", "save")))
    times = StageTimes(stages, progress=progress, on_stage=on_stage)
    try:
        from fxport.builder import speedups

        lowering_fast = LOWERING_SPEEDUPS.get(options.backend, ())
        with StageGC(options.speedups) as gc_pause, speedups.enabled(options.speedups) as fast:
            times.start("load")
            # A dry run needs shapes only: a preset is built on the meta device (a 31B-shaped
            # model without 120 GB of random weights).
            model, tokenizer = load_source(source, options.max_seq_len, progress=False,
                                           meta=options.dry_run and source.preset is not None)
            _check_ring(model, options)
            result = BuildResult(None, options, times, model=model)
            if options.quant:
                gc_pause.boundary()
                times.start("quantize")
                result.quant_report = backend.quantize(model, options.quant, tokenizer=tokenizer)
            result.metadata = model_metadata(model, options.max_prefill_chunk, tokenizer)
            gc_pause.boundary()
            with fast.fake_propagation():
                times.start("export")
                methods = tuple(backend.METHODS) + ((VERIFY,) if options.verify else ())
                programs = export_programs(model, options, methods)
                gc_pause.boundary()
                with fast.codegen():
                    times.start("passes")
                    programs, result.pass_results = backend.run_passes(programs, options,
                                                                       windows=sliding_windows(model))
                    if any(r.stats.rewritten for p in result.pass_results.values() for r in p.records
                           if r.name == "custom_sdpa"):  # the runner must provide llama::custom_sdpa
                        result.metadata = {**result.metadata, USE_SDPA_WITH_KV_CACHE: 1}
                    gc_pause.boundary()
                    times.start("lower")
                    if options.dry_run:
                        with fast.lowering() if "dry_run" in lowering_fast else contextlib.nullcontext():
                            result.report = backend.dry_run(programs)
                        if hasattr(result.report, "check_contract"):  # the report prints what it found
                            result.report.pass_results = result.pass_results
                            result.report.check_contract(result.metadata)  # ExecuTorch's LLM-runner contract
                        return result
                    with fast.lowering() if "lower" in lowering_fast else contextlib.nullcontext():
                        lowered = backend.lower(programs, constant_methods=result.metadata,
                                                on_serialize=lambda: (gc_pause.boundary(), times.start("serialize")))
                    result.speedups = {"off": dict(fast.off), "skipped": dict(fast.skipped)} if options.speedups else {}
        result.report = lowered.report
        times.start("save")
        out = Path(out)
        # The program and its tokenizer sidecar are published together (temporaries, fsync,
        # renames last); without a tokenizer a previous sidecar is removed, never left stale.
        fill = None if tokenizer is None else (lambda d: fill_tokenizer_dir(tokenizer, d))
        result.extra_files = lowered.write(out, sidecar=tokenizer_sidecar(out), fill_sidecar=fill)
        result.out = out
        result.tokenizer_dir = tokenizer_sidecar(out) if tokenizer is not None else None
        if reuse:
            write_manifest(out, inputs or build_inputs(source, options), times, files=result.extra_files)
        else:
            manifest_path(out).unlink(missing_ok=True)  # a stale manifest must not vouch for this file
        return result
    finally:
        times.close()
