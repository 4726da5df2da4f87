"""Readable dumps of ExportedPrograms: per-pass before/after/diff files and ``fxport dump``.

Per pass, :func:`write_pass_dump` writes into the dump directory (``NN`` is the pass's
1-based position in the pipeline, ``name`` its snake_case name)::

    NN_name.before.txt   graph (print_readable style) + graph signature before the pass
    NN_name.after.txt    the same after the pass
    NN_name.diff         unified diff before -> after
    NN_name.ops.txt      op histogram delta (ops whose count changed, totals)
    NN_name.stats.json   {"pass", "method", "changed", "seconds", "stats": PassStats.as_dict()}
    NN_name.after.pt2    only when ``model_explorer`` (ai-edge-model-explorer) is importable:
                         the program after the pass, which Model Explorer opens directly

:func:`dump_program` renders one program (or a saved ``.pt2``) as text: signature, inputs,
outputs and buffers with shapes, op histogram and graph; ``fxport dump`` prints it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument

from fxport import fileio
from fxport.debug.histogram import delta_text, histogram_text, op_histogram

DUMP_ENV = "FXPORT_DUMP"


def dump_dir_from_env() -> Path | None:
    """The directory named by ``FXPORT_DUMP`` (None when unset or empty)."""
    value = os.environ.get(DUMP_ENV, "").strip()
    return Path(value) if value else None


def graph_text(ep: ExportedProgram) -> str:
    """``print_readable`` text of the graph followed by the graph signature."""
    code = ep.graph_module.print_readable(print_output=False)
    return f"{code.rstrip()}\n\n# graph signature\n{ep.graph_signature}\n"


def diff_text(before: str, after: str, name: str = "graph") -> str:
    """Unified diff of two graph texts (empty string when equal)."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"{name}.before",
        tofile=f"{name}.after",
    )
    return "".join(lines)


def model_explorer_available() -> bool:
    return importlib.util.find_spec("model_explorer") is not None


def write_pass_dump(
    directory: Union[str, Path],
    index: int,
    name: str,
    before: ExportedProgram,
    after: ExportedProgram,
    *,
    changed: bool,
    stats: dict[str, Any],
    method: str | None = None,
    seconds: float | None = None,
    before_text: str | None = None,
    after_text: str | None = None,
) -> list[Path]:
    """Write the five per-pass files (six with Model Explorer); returns their paths.

    ``before_text`` / ``after_text`` let the pipeline reuse texts it already rendered.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{index:02d}_{name}"
    before_text = graph_text(before) if before_text is None else before_text
    if after_text is None:
        after_text = before_text if after is before else graph_text(after)
    files = {
        f"{stem}.before.txt": before_text,
        f"{stem}.after.txt": after_text,
        f"{stem}.diff": diff_text(before_text, after_text, stem),
        f"{stem}.ops.txt": delta_text(op_histogram(before), op_histogram(after)),
        f"{stem}.stats.json": json.dumps(
            {"pass": name, "method": method, "changed": changed, "seconds": seconds, "stats": stats},
            indent=2,
            default=str,
        )
        + "\n",
    }
    paths = []
    for fname, text in files.items():
        path = directory / fname
        fileio.write_text(path, text)
        paths.append(path)
    if model_explorer_available():
        path = directory / f"{stem}.after.pt2"
        with fileio.atomic_path(path) as tmp:
            torch.export.save(after, str(tmp.with_suffix(".pt2")))  # torch.export.save wants the suffix
            os.replace(tmp.with_suffix(".pt2"), tmp)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- fxport dump


def _val_text(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{str(val.dtype).removeprefix('torch.')}[{dims}]"
    if val is None:
        return "?"
    return f"{type(val).__name__}({val})"


def _table(rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return "  (none)\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out) + "\n"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _logged_errors():
    """torch.export.load logs a full traceback (as a warning) before raising a generic error on a
    bad file: keep those records off stderr and hand their exceptions to the caller."""
    logger = logging.getLogger("torch.export")
    handler = _Collect()
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # the CLI may have raised it to ERROR; the record carries the cause
    try:
        yield handler.errors
    finally:
        logger.handlers[:], logger.propagate, _ = saved
        logger.setLevel(saved[2])


def load_pt2(path: Union[str, Path]) -> ExportedProgram:
    """``torch.export.load`` with one-line errors: ValueError naming the file and what it is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fxport dump: {path} does not exist; pass a file written by torch.export.save")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a .pt2 written by torch.export.save or a .pte")
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:6] == b"ET":
        raise ValueError(f"{path} is an ExecuTorch program, not a .pt2; name it *.pte to dump it as one")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a program saved by torch.export.save (not a zip archive); "
                         "pass a .pt2 written by torch.export.save or a .pte")
    with _logged_errors() as logged:
        try:
            return torch.export.load(str(path))
        except Exception as exc:  # torch raises RuntimeError / KeyError / ... on foreign archives
            failure = logged[0] if logged else exc
    text = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
    # first sentence, without a "[enforce fail at file.cc:N] ." prefix
    reason = text.split("] ")[-1].lstrip(". ").split(". ")[0][:160] or type(failure).__name__
    raise ValueError(f"{path} is not a program saved by torch.export.save ({reason}); "
                     "pass a .pt2 written by torch.export.save or a .pte") from None


def dump_program(program: Union[str, Path, ExportedProgram], *, graph: bool = True) -> str:
    """Text report of a program: inputs, outputs, buffers (with shapes), op histogram, graph.

    ``program`` is an ``ExportedProgram`` or the path of a ``torch.export.save``d ``.pt2``.
    """
    if isinstance(program, ExportedProgram):
        ep, title = program, "ExportedProgram"
    else:
        path = Path(program)
        ep, title = load_pt2(path), str(path)

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes}
    inputs, buffers, params = [], [], []
    n_param_bytes = 0
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else str(spec.arg)
        shape = _val_text(vals.get(name))
        if spec.kind == InputKind.USER_INPUT:
            inputs.append((name, shape))
        elif spec.kind == InputKind.BUFFER:
            persistent = "persistent" if spec.persistent else "non-persistent"
            buffers.append((str(spec.target), shape, persistent))
        else:
            params.append((str(spec.target), shape, spec.kind.name.lower()))
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if isinstance(t, torch.Tensor):
                n_param_bytes += t.numel() * t.element_size()
    outputs = []
    for spec in ep.graph_signature.output_specs:
        name = spec.arg.name if isinstance(spec.arg, TensorArgument) else str(getattr(spec.arg, "name", spec.arg))
        target = f" -> {spec.target}" if spec.target else ""
        outputs.append((name, _val_text(vals.get(name)), f"{spec.kind.name.lower()}{target}"))

    user_outputs = [shape for _, shape, kind in outputs if kind == "user_output"]
    signature = ", ".join(f"{n}: {shape}" for n, shape in inputs)
    parts = [f"# {title}\n"]
    if ep.range_constraints:
        ranges = ", ".join(f"{s}: [{r.lower}, {r.upper}]" for s, r in ep.range_constraints.items())
        parts.append(f"symbolic ranges: {ranges}\n")
    parts.append(f"signature: forward({signature}) -> ({', '.join(user_outputs)})\n")
    parts.append(f"\n## user inputs ({len(inputs)})\n" + _table(inputs))
    parts.append(f"\n## outputs ({len(outputs)})\n" + _table(outputs))
    parts.append(f"\n## buffers ({len(buffers)})\n" + _table(buffers))
    parts.append(
        f"\n## parameters and constants ({len(params)}, {n_param_bytes / 2**20:.2f} MiB)\n" + _table(params)
    )
    parts.append("\n## op histogram\n" + histogram_text(op_histogram(ep)))
    if graph:
        parts.append("\n## graph\n" + graph_text(ep))
    return "".join(parts)


# ----------------------------------------------------------------------------- fxport dump X.pte

# ExecuTorch's ScalarType numbers (c10's) -> the names dump prints
_SCALAR_NAMES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                 7: "float64", 11: "bool", 15: "bfloat16"}


def _tensor_text(dtype: Any, sizes: Any) -> str:
    name = _SCALAR_NAMES.get(int(dtype), f"ScalarType {int(dtype)}")
    return f"{name} ({', '.join(str(int(s)) for s in sizes)}{',' if len(sizes) == 1 else ''})"


def is_runner_multimodal(method_names: Any) -> bool:
    """A program in ExecuTorch ``MultimodalRunner``'s layout (a ``token_embedding`` or
    ``text_decoder`` method, or encoders without a text method); the merged multimodal layout
    (``prefill`` taking features) is a text program to ``fxport dump``."""
    from fxport import contract

    names = set(method_names)
    return bool({contract.TOKEN_EMBEDDING, contract.TEXT_DECODER} & names) or (
        contract.text_method(names) is None and bool(set(contract.MULTIMODAL_METHODS) & names))


def describe_multimodal_pte(path: Union[str, Path], data_path: Union[str, Path, None] = None) -> str:
    """``fxport dump`` of a ``.pte`` in ExecuTorch ``MultimodalRunner``'s layout
    (:mod:`fxport.builder.multimodal`): every method with its inputs and outputs (dtype, max
    sizes), the constant methods (the text contract's, then :data:`fxport.contract.MULTIMODAL_CONSTANTS`,
    "missing" for absent ones), and the verdict of :func:`fxport.contract.multimodal_problems`.

    data_path: its ``.ptd`` (default: ``<stem>.ptd`` beside it when that exists). The program is
    read without loading its compute methods, so a program the runner refuses is still described.
    Raises ValueError (one line) for a file ExecuTorch cannot load (``fxport dump`` checks that
    first, with :func:`fxport.runtime.backend.program_methods`).
    """
    from executorch.runtime import Runtime

    from fxport import contract

    path = Path(path)
    if data_path is None and fileio.weights_file(path).is_file():
        data_path = fileio.weights_file(path)
    try:
        prog = Runtime.get().load_program(path, data_path=data_path)
    except Exception as exc:  # the runtime raises RuntimeError with a status code
        raise ValueError(f"{path} is not a loadable ExecuTorch program ({exc})") from None
    names = set(prog.method_names)
    known = (*contract.CONSTANT_METHODS, *contract.MULTIMODAL_CONSTANTS)
    order = [m for m in contract.MULTIMODAL_METHODS if m in names]
    # a method with no inputs is a constant method (to_edge's constant_methods)
    order += sorted(m for m in names - set(order) - set(known) if prog.metadata(m).num_inputs() > 0)
    inputs, outputs = {}, {}
    out = [f"# {path}", f"methods: {', '.join(sorted(names))}", "methods (ExecuTorch MultimodalRunner layout; max sizes):"]
    for name in order:
        meta = prog.metadata(name)
        inputs[name] = [(meta.input_tensor_meta(i).dtype(), tuple(meta.input_tensor_meta(i).sizes()))
                        for i in range(meta.num_inputs())]
        outputs[name] = [(meta.output_tensor_meta(i).dtype(), tuple(meta.output_tensor_meta(i).sizes()))
                         for i in range(meta.num_outputs())]
        ins = ", ".join(_tensor_text(d, s) for d, s in inputs[name])
        outs = ", ".join(_tensor_text(d, s) for d, s in outputs[name])
        out.append(f"  {name}: {ins} -> {outs}")
    constants: dict[str, Any] = {}
    for title, keys in (("constant methods (text contract):", contract.CONSTANT_METHODS),
                        ("constant methods (multimodal):", contract.MULTIMODAL_CONSTANTS)):
        out.append(title)
        for key in keys:
            if key not in names:
                out.append(f"  {key}: missing")
                continue
            values = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                      for v in prog.load_method(key).execute([])]
            constants[key] = values if key == contract.EOS_IDS else values[0]  # get_eos_ids returns a list
            out.append(f"  {key}: {constants[key]}")
    others = sorted(names - set(order) - set(known))
    if others:
        out.append(f"other constant methods: {', '.join(others)}")
    problems = contract.multimodal_problems(names, constants, inputs, outputs)
    out.append("ExecuTorch MultimodalRunner contract: " + ("ok" if not problems else "; ".join(problems)))
    return "\n".join(out)
