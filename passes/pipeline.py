"""Run a list of passes over one ExportedProgram: ``apply(ep, passes, method=..., dump=...)``.

The pipeline
  1. normalizes the program once to functional ATen IR (:func:`fxport.passes.graph.to_functional`:
     torch.export's training IR with in-place ``index_copy_`` becomes ``index_copy`` + a
     ``BUFFER_MUTATION`` output), so every pass sees the same IR whatever produced it; a program
     already in that dialect (``ep.dialect == "ATEN"``) is used as it is. Before that, lifted
     constants that alias a parameter/buffer are folded into it (:func:`fold_aliased_constants`:
     transformers' static caches exported non-strict, which ``run_decompositions`` rejects);
  2. runs the passes in order, each through ``Pass.__call__`` (private copy; on change, a fast metadata
     refresh, :func:`fxport.passes.graph.update`, with a full re-trace as the fallback)
     with ``PassContext(method=method)``;
  3. validates the program after every pass (``ep.validate()``); a pass whose output fails
     validation is a bug, reported as :class:`PipelineError` naming the pass;
  4. when ``dump`` is given or ``FXPORT_DUMP`` is set, writes per-pass files
     (``NN_name.before.txt/.after.txt/.diff/.ops.txt/.stats.json``, see
     :mod:`fxport.debug.dump`) into that directory, in a ``<method>/`` subdirectory when
     ``method`` is given so prefill and decode dumps do not overwrite each other; a pass that
     raises leaves ``NN_name.before.txt`` and ``NN_name.error.txt`` (the traceback).

The caller's program is never mutated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import torch
from torch.export import ExportedProgram

from fxport.passes.base import Pass, PassContext, PassError, PassResult, PassStats, snake_case
from fxport.passes.graph import clone_program, placeholders, to_functional


class PipelineError(RuntimeError):
    """A pass raised something other than a :class:`PassError`, or its output was invalid."""


@dataclass
class PassRecord:
    """What one pass did inside :func:`apply`."""

    index: int  # 1-based position in the pipeline (the NN of the dump files)
    name: str
    changed: bool
    stats: PassStats
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pass": self.name,
            "changed": self.changed,
            "seconds": round(self.seconds, 4),
            "stats": self.stats.as_dict(),
        }


@dataclass
class PipelineResult:
    """The final program and one :class:`PassRecord` per pass, in order."""

    ep: ExportedProgram
    records: list[PassRecord] = field(default_factory=list)
    method: str | None = None
    dump_dir: Path | None = None

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)

    @property
    def results(self) -> list[PassRecord]:
        return self.records

    def stats(self) -> dict[str, PassStats]:
        """Pass name -> its stats (a name used twice gets ``#2``, ``#3`` suffixes)."""
        out: dict[str, PassStats] = {}
        for r in self.records:
            key, k = r.name, 2
            while key in out:
                key, k = f"{r.name}#{k}", k + 1
            out[key] = r.stats
        return out

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} in this pipeline; ran: {[r.name for r in self.records]}")

    def summary(self) -> str:
        """One line per pass: ``NN name changed matched rewritten skipped{reason: n}``."""
        lines = []
        for r in self.records:
            s = r.stats
            skipped = f" skipped={dict(s.skipped)}" if s.skipped else ""
            lines.append(
                f"{r.index:02d} {r.name}: changed={r.changed} matched={s.matched} "
                f"rewritten={s.rewritten}{skipped} ({r.seconds:.2f}s)"
            )
        return "\n".join(lines)


def pass_name(p: Any) -> str:
    """Name used in records and dump files: an overridden ``name``, else the class name in
    snake_case with acronyms kept whole (``RingBufferKVCache`` -> ``ring_buffer_kv_cache``,
    ``SDPADispatch`` -> ``sdpa_dispatch``)."""
    if getattr(type(p), "name", None) is not Pass.name:
        name = getattr(p, "name", None)
        if isinstance(name, str) and name:
            return name
    return snake_case(type(p).__name__)


def _resolve_dump(dump: Union[str, Path, None, bool], method: str | None) -> Path | None:
    from fxport.debug.dump import dump_dir_from_env

    if dump is False:
        return None
    directory = Path(dump) if dump not in (None, True) else dump_dir_from_env()
    if directory is None:
        return None
    return directory / method if method else directory


def _check_apply_args(ep: Any, passes: Any) -> list[Pass]:
    """TypeError naming what ``apply`` got and what to pass instead."""
    if not isinstance(ep, ExportedProgram):
        if isinstance(ep, torch.nn.Module):
            hint = (f"got the module {type(ep).__name__}; export it first: "
                    "apply(torch.export.export(model, example_args), passes)")
        elif isinstance(ep, (str, Path)):
            hint = f"got the path {str(ep)!r}; load it first: apply(torch.export.load(path), passes)"
        else:
            hint = f"got {_describe(ep)}; pass torch.export.export(model, example_args)"
        raise TypeError(f"apply: the first argument must be a torch.export.ExportedProgram; {hint}")
    if isinstance(passes, (Pass, type)) or not isinstance(passes, Iterable):
        raise TypeError(f"apply: passes must be a list of pass instances, got {_describe(passes)}; "
                        "write apply(ep, [SomePass()])")
    passes = list(passes)
    for i, p in enumerate(passes):
        if isinstance(p, type):
            raise TypeError(f"apply: passes[{i}] is the class {p.__name__}, not an instance; "
                            f"pass {p.__name__}() (with its options) instead")
        if not callable(p):
            raise TypeError(f"apply: passes[{i}] is {_describe(p)}, not a pass; pass instances of "
                            "fxport.passes.base.Pass (or callables p(ep, ctx) -> PassResult)")
    return passes


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}" + (f" ({obj!r})" if isinstance(obj, (str, int, float)) else "")


def apply(
    ep: ExportedProgram,
    passes: Iterable[Pass],
    *,
    method: str | None = None,
    dump: Union[str, Path, None, bool] = None,
    validate: bool = True,
) -> PipelineResult:
    """Run ``passes`` in order over ``ep``; return the final program and per-pass records.

    Args:
        ep: any ExportedProgram (training or functional IR; it is normalized once here).
        passes: :class:`Pass` instances (anything callable as ``p(ep, PassContext) -> PassResult``).
        method: "prefill", "decode" or None; handed to every pass in :class:`PassContext`.
        dump: directory for per-pass dump files; None reads ``FXPORT_DUMP``; False disables.
        validate: call ``ep.validate()`` after every pass (and after normalization).

    Raises:
        TypeError: ``ep`` is not an ExportedProgram (an ``nn.Module``, a path, ...) or a pass is a
            class instead of an instance, or not callable; the message says what to pass.
        PassError: a pass refused its input (message from the pass, naming the fix).
        PipelineError: a pass crashed or returned an invalid program; the message names it.
    """
    passes = _check_apply_args(ep, passes)
    dump_dir = _resolve_dump(dump, method)
    ctx = PassContext(method=method)

    # Programs already in functional ATen IR (run_decompositions output, pass output) are kept:
    # re-tracing them would only cost time.
    current = ep if getattr(ep, "dialect", None) == "ATEN" else to_functional(fold_aliased_constants(ep))
    if validate:
        current.validate()

    records: list[PassRecord] = []
    previous_text: str | None = None
    for index, p in enumerate(passes, start=1):
        name = pass_name(p)
        start = time.perf_counter()
        try:
            result = p(current, ctx)
        except Exception as exc:
            if dump_dir is not None:  # leave the failing input and the error next to the other dumps
                _dump_error(dump_dir, index, name, current, exc, previous_text)
            if isinstance(exc, PassError):
                raise
            # a crash inside a pass is a bug in that pass: say which
            raise PipelineError(f"pass {index:02d} {name} (method={method}) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PipelineError(f"pass {index:02d} {name} returned {type(result).__name__}, expected PassResult")
        if validate and result.changed:
            try:
                result.ep.validate()
            except Exception as exc:
                raise PipelineError(f"pass {index:02d} {name} (method={method}) produced an invalid program: {exc}") from exc
        seconds = time.perf_counter() - start
        record = PassRecord(index, name, result.changed, result.stats, seconds)
        records.append(record)
        if dump_dir is not None:
            previous_text = _dump_pass(dump_dir, record, current, result.ep, method, previous_text)
        current = result.ep

    out = PipelineResult(current, records, method, dump_dir)
    if dump_dir is not None:
        summary = {"method": method, "passes": [r.as_dict() for r in records]}
        (dump_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


def fold_aliased_constants(ep: ExportedProgram) -> ExportedProgram:
    """Replace lifted constants that alias a parameter or buffer by that input.

    Non-strict ``torch.export`` of transformers' static-cache wrappers lifts the cache tensors
    it reaches through the ``Cache`` object as constants (``...self_attn.lifted_tensor_3``)
    although they are also registered buffers (``key_cache_0``); the in-place cache writes then
    hit the constant, and ``run_decompositions`` fails on the duplicated input ("expected
    compiled_fn to be GraphModule"). Reading and writing the buffer instead is what the eager
    model does (it is the same tensor). Returns ``ep`` itself when nothing aliases, else a copy.
    """
    from torch.export.graph_signature import InputKind

    def key(t):
        """Storage identity; None where it proves nothing (meta/fake/empty tensors)."""
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor):
            return None
        if t.device.type == "meta" or t.numel() == 0 or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    owners: dict = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            k = key(ep.state_dict.get(spec.target, ep.constants.get(spec.target)))
            if k is not None:
                owners.setdefault(k, spec.arg.name)
    aliased = []
    for spec in ep.graph_signature.input_specs:
        k = key(ep.constants.get(spec.target)) if spec.kind == InputKind.CONSTANT_TENSOR else None
        if k is not None and k in owners:
            aliased.append((spec.arg.name, owners[k]))
    if not aliased:
        return ep
    ep = clone_program(ep)
    nodes = placeholders(ep)
    specs = ep.graph_signature.input_specs
    for const_name, owner_name in aliased:
        const = nodes[const_name]
        const.replace_all_uses_with(nodes[owner_name])
        ep.graph.erase_node(const)
        spec = next(s for s in specs if s.arg.name == const_name)
        specs.remove(spec)
        if not any(s.target == spec.target for s in specs):
            ep.constants.pop(spec.target, None)
    ep.graph_module.recompile()
    return ep


def _dump_error(dump_dir: Path, index: int, name: str, before: ExportedProgram, exc: Exception, text: str | None) -> None:
    """``NN_name.before.txt`` and ``NN_name.error.txt`` for a pass that raised."""
    import traceback

    from fxport.debug.dump import graph_text

    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / f"{index:02d}_{name}.before.txt").write_text(graph_text(before) if text is None else text)
    (dump_dir / f"{index:02d}_{name}.error.txt").write_text("".join(traceback.format_exception(exc)))


def _dump_pass(
    dump_dir: Path,
    record: PassRecord,
    before: ExportedProgram,
    after: ExportedProgram,
    method: str | None,
    before_text: str | None,
) -> str:
    """Write the dump files of one pass; returns the ``after`` text (next pass's ``before``)."""
    from fxport.debug.dump import graph_text, write_pass_dump

    before_text = graph_text(before) if before_text is None else before_text
    after_text = graph_text(after) if record.changed else before_text
    write_pass_dump(
        dump_dir,
        record.index,
        record.name,
        before,
        after,
        changed=record.changed,
        stats=record.stats.as_dict(),
        method=method,
        seconds=round(record.seconds, 4),
        before_text=before_text,
        after_text=after_text,
    )
    return after_text


def run_methods(
    programs: dict[str, ExportedProgram],
    passes: Sequence[Pass],
    *,
    dump: Union[str, Path, None, bool] = None,
    validate: bool = True,
) -> dict[str, PipelineResult]:
    """:func:`apply` the same passes to every method of ``{"prefill": ep, "decode": ep}``."""
    return {m: apply(ep, passes, method=m, dump=dump, validate=validate) for m, ep in programs.items()}
