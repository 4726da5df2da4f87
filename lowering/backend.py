"""The contract a backend keeps: what :func:`fxport.builder.build` calls, in order.

A backend is a module (:mod:`fxport.lowering.xnnpack`, :mod:`fxport.lowering.cuda`) with these
names; :class:`Backend` states them once, and the builder checks a backend module against it
(``isinstance(module, Backend)``) before any work. A backend knows ExecuTorch, its partitioner,
its quantization recipes and its pass set; it knows nothing of the model family or of the
builder (it imports neither ``fxport.models`` nor ``fxport.builder``): what it needs from the
model comes in as arguments (``windows``), its options as any object with the fields of
:class:`BackendOptions` (the builder's ``BuildOptions``).

The order, with what each step may assume:

1. ``validate(options)``, before any work: refuse options this backend cannot build (an unknown
   recipe name, a dry run it does not offer, a GPU it needs and does not see) with a one-line
   ``ValueError`` naming the option and the fix. Nothing is loaded or written.
2. ``quantize(model, recipe, tokenizer=None)``, when ``options.quant`` is set: quantize the
   eager model in place with the backend's recipe (``tokenizer`` encodes calibration text for
   recipes that calibrate); returns a report (``summary()`` when it has one).
3. The builder exports ``METHODS`` (plus ``target_verify`` when ``options.verify``) in
   functional ATen IR, the same export for every backend.
4. ``run_passes(programs, options, *, windows)``: the backend's pass set over each method;
   ``windows`` maps each sliding-window KV-cache buffer FQN to its window (empty: none).
   Returns ``(programs, {method: PipelineResult})``.
5. ``dry_run(programs)`` when ``options.dry_run`` (a report, nothing compiled or written), else
   ``lower(programs, *, constant_methods, on_serialize=None)``: one program of every method,
   ``constant_methods`` stored as the runner's metadata methods, ``on_serialize()`` called once
   when serialization starts. Returns a :class:`Lowered`. The builder may run either step under
   its compile-time patches (:mod:`fxport.builder.speedups`); a backend never applies them.
6. ``lowered.write(out, *, sidecar=None, fill_sidecar=None)``: publish the program at ``out``,
   the files it needs beside it (a ``.ptd`` of weights) and the ``sidecar`` directory filled by
   ``fill_sidecar(dir)`` as one set (:func:`fxport.fileio.write_program`: a reader sees the
   whole previous set or the whole new one); returns the extra files written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from torch.export import ExportedProgram


class BackendOptions(Protocol):
    """The option fields a backend reads (``fxport.builder.BuildOptions`` has them all)."""

    quant: str | None
    max_prefill_chunk: int
    ring_size: int | None
    dump: str | None
    dry_run: bool
    verify: bool


@runtime_checkable
class Lowered(Protocol):
    """What ``lower`` returns: the backend's report (delegation) and how to publish the program."""

    report: Any

    def write(self, out: str | Path, *, sidecar: Path | None = None,
              fill_sidecar: Callable[[Path], None] | None = None) -> list[Path]: ...


@runtime_checkable
class Backend(Protocol):
    """A lowering backend (see the module docstring for the order and the contract of each)."""

    NAME: str  # the --backend name
    PROGRAM_SUFFIX: str  # what the written program's name ends in (".pte")
    METHODS: tuple[str, ...]  # the methods the builder exports for it

    def validate(self, options: BackendOptions) -> None: ...

    def quantize(self, model: Any, recipe: str, tokenizer: Any = None) -> Any: ...

    def run_passes(self, programs: Mapping[str, ExportedProgram], options: BackendOptions, *,
                   windows: Mapping[str, int]) -> tuple[dict[str, ExportedProgram], dict]: ...

    def dry_run(self, programs: Mapping[str, ExportedProgram]) -> Any: ...

    def lower(self, programs: Mapping[str, ExportedProgram], *, constant_methods: Mapping[str, Any],
              on_serialize: Callable[[], None] | None = None) -> Lowered: ...
