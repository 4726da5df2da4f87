"""ExecuTorch's own LLM runner driving a fxport program: ``fxport run --runner executorch``.

``executorch.extension.llm.runner.TextLLMRunner`` (Python bindings of the C++
``extension/llm/runner``, the runner behind ``llama_main`` and the Android / iOS LLM APIs) loads
the ``.pte``, its ``.ptd`` weights and the ``tokenizer.json`` beside it and generates, reading
only the program contract of :mod:`fxport.contract`. This module wraps it for the CLI, the
benchmarks and the tests, with the call a user's own script makes::

    import executorch.kernels.quantized            # the quantized ops (embedding_byte) the program uses
    import executorch.extension.llm.custom_ops.custom_ops   # llama::custom_sdpa (not with --no-custom-sdpa)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    runner = TextLLMRunner("model.pte", "model.tokenizer/tokenizer.json", "model.ptd")
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=32, temperature=0.0, num_bos=1))

``num_bos=1`` asks the runner for BOS: its tokenizer then runs ``tokenizer.json``'s post-processor,
which prepends ``<bos>`` (with ``num_bos=0``, ExecuTorch 1.5.1's ``HFTokenizer`` adds nothing).

The runner prints each piece to the process's stdout and logs to stderr from C++; :class:`StockRunner`
keeps both off the terminal (fds 1 and 2 redirected around each call) and hands pieces to a callback.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fxport.fileio import weights_file


class StockRunnerError(ValueError):
    """The stock runner refused the program or the prompt; the message has the runner's reason."""


@dataclass
class RunnerGeneration:
    """One ``generate`` of the stock runner: the new text and the runner's own ``Stats``."""

    text: str
    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0  # the runner's num_generated_tokens: its decode steps (len(pieces) - 1)
    prefill_s: float = 0.0  # inference start -> prompt evaluated (the runner's ms clock)
    decode_s: float = 0.0  # prompt evaluated -> end
    load_s: float = 0.0  # the runner loads the program at its first generate

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes out of prefill; Stats counts the decode steps after it.
        steps = self.generated_tokens
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers (the runner's printf output sits there until then)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _native_output(keep: bool) -> Iterator[list[str]]:
    """Send what native code writes to fds 1 and 2 (the runner's printf and its log) to temporary
    files for the block, while Python's ``sys.stdout`` keeps writing to the terminal; the captured
    text lands in the yielded list (stdout, stderr), and the log is written back when ``keep``."""
    import sys

    captured: list[str] = []
    saved = [os.dup(1), os.dup(2)]
    py_stdout = sys.stdout
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_stdio()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(os.dup(saved[0]), "w", encoding="utf-8", errors="replace", buffering=1)
        try:
            yield captured
        finally:
            _flush_c_stdio()
            with contextlib.suppress(Exception):
                sys.stdout.close()
            sys.stdout = py_stdout
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for f in (out, err):
                f.seek(0)
                captured.append(f.read().decode("utf-8", errors="replace"))
            if keep:
                sys.stderr.write(captured[0] + captured[1])
                sys.stderr.flush()


def default_tokenizer(pte: str | Path) -> Path:
    """``<stem>.tokenizer/tokenizer.json`` beside the program: where ``fxport export`` writes it."""
    return Path(pte).with_suffix(".tokenizer") / "tokenizer.json"


class StockRunner:
    """ExecuTorch's ``TextLLMRunner`` over a program (see the module docstring).

    pte: the program; tokenizer: its ``tokenizer.json`` (default: :func:`default_tokenizer`);
    data: its ``.ptd`` weights (default: ``<stem>.ptd`` when it exists).
    verbose: show the runner's log lines. Raises :class:`StockRunnerError` when a file is
    missing or the runner cannot load the program.
    """

    def __init__(self, pte: str | Path, tokenizer: str | Path | None = None, data: str | Path | None = None,
                 *, verbose: bool = False):
        pte, tokenizer, data = runner_files(pte, tokenizer, data)
        self.pte, self.tokenizer, self.data, self.verbose = pte, tokenizer, data, verbose
        with _native_output(verbose):  # the bindings log from static initializers at import too
            from fxport.contract import load_llm_kernels

            load_llm_kernels()  # embedding_byte & co., llama::custom_sdpa for the runner's kernel registry
            from executorch.extension.llm.runner import TextLLMRunner

            # after the imports: rss_delta counts the tokenizer and the program, not the libraries
            self.rss_before = rss_bytes()
            try:
                self._runner = TextLLMRunner(str(pte), str(tokenizer), None if data is None else str(data))
            except Exception as exc:  # the bindings raise RuntimeError with the runner's status
                raise StockRunnerError(f"ExecuTorch's TextLLMRunner cannot load {pte}: {exc}") from None

    def generate(self, prompt: str, max_new_tokens: int, *, temperature: float = 0.0, num_bos: int = 1,
                 on_piece: Callable[[str], None] | None = None, warmup: bool = False) -> RunnerGeneration:
        """Greedy (``temperature=0``) generation of up to ``max_new_tokens`` after ``prompt``.

        The runner's KV position is reset first, so every call starts a new sequence.
        ``on_piece(text)`` gets each new piece as the runner decodes it.
        """
        return run_generation(self._runner, "TextLLMRunner", self.pte, self.verbose, prompt, max_new_tokens,
                              temperature=temperature, num_bos=num_bos, on_piece=on_piece, warmup=warmup,
                              reason=_check_failed_reason)

    def rss_delta(self) -> int:
        """Bytes of RSS this runner added: RSS now minus RSS just before ``TextLLMRunner`` was created
        (its tokenizer, and the program once the first ``generate`` loaded it; the bindings' own
        libraries not counted)."""
        return rss_bytes() - self.rss_before


def runner_files(pte: str | Path, tokenizer: str | Path | None, data: str | Path | None) -> tuple[Path, Path, Path | None]:
    """The program, its ``tokenizer.json`` (default: :func:`default_tokenizer`) and its ``.ptd``
    (default: ``<stem>.ptd`` when it exists) an ExecuTorch runner loads; a missing one raises
    :class:`StockRunnerError` naming it."""
    pte = Path(pte)
    tokenizer = Path(tokenizer) if tokenizer is not None else default_tokenizer(pte)
    if data is None and weights_file(pte).is_file():
        data = weights_file(pte)
    for what, path in (("program", pte), ("tokenizer", tokenizer), ("weights file", data)):
        if path is not None and not Path(path).is_file():
            raise StockRunnerError(f"no such {what}: {path}" + (
                "; ExecuTorch's runner needs the tokenizer.json fxport export writes beside the .pte "
                "(pass --tokenizer)" if what == "tokenizer" else ""))
    return pte, tokenizer, None if data is None else Path(data)


def _check_failed_reason(log: list[str]) -> str:
    """TextLLMRunner's failure in its log: the kernel's first "Check failed" line and the last line."""
    checks = [line.split("] ", 1)[-1] for line in log if "Check failed" in line][:1]
    return " ".join(checks + log[-1:])


def run_generation(runner, name: str, pte, verbose: bool, prompt, max_new_tokens: int, *, temperature: float,
                   num_bos: int, on_piece: Callable[[str], None] | None, warmup: bool,
                   reason: Callable[[list[str]], str]) -> RunnerGeneration:
    """One ``generate`` call of an ExecuTorch LLM runner (``TextLLMRunner`` or ``MultimodalRunner``,
    called ``name`` in errors) from a fresh sequence: its pieces, ``Stats`` times, and on failure a
    :class:`StockRunnerError` with ``reason(stderr lines)`` (the runner's own log, captured)."""
    from executorch.extension.llm.runner import GenerationConfig

    runner.reset()
    pieces: list[str] = []
    stats: list = []

    def piece(text: str) -> None:
        pieces.append(text)
        if on_piece is not None:
            on_piece(text)

    config = GenerationConfig(echo=False, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              num_bos=int(num_bos), warming=warmup)
    from fxport.runtime.pte_backend import one_openmp_level

    with _native_output(verbose) as captured, one_openmp_level():  # reproducible --custom-sdpa programs
        try:
            runner.generate(prompt, config, piece, lambda s: stats.append(_copy_stats(s)))
        except Exception as exc:
            failure = exc
        else:
            failure = None
    if failure is not None or not stats:
        why = reason(captured[1].splitlines() if len(captured) > 1 else [])
        raise StockRunnerError(f"ExecuTorch's {name} failed on {pte}: {failure or 'no stats'}"
                               + (f": {why}" if why else ""))
    s = stats[0]
    return RunnerGeneration("".join(pieces), pieces, s["prompt_tokens"], s["generated_tokens"],
                            s["prefill_s"], s["decode_s"], s["load_s"])


def _copy_stats(stats) -> dict:
    """The fields of the runner's ``Stats`` (a view into C++ state, valid only in the callback)."""
    ms = 1000.0
    return {"prompt_tokens": int(stats.num_prompt_tokens), "generated_tokens": int(stats.num_generated_tokens),
            "prefill_s": (stats.prompt_eval_end_ms - stats.inference_start_ms) / ms,
            "decode_s": (stats.inference_end_ms - stats.prompt_eval_end_ms) / ms,
            "load_s": (stats.model_load_end_ms - stats.model_load_start_ms) / ms}


BENCH_TEXT = ("The history of the city goes back to the Roman era, when a small settlement was founded on the banks "
              "of the river. Over the centuries it grew into a major center of trade, art and science, attracting "
              "merchants and scholars from all over the continent. ")


def bench_prompt(tokenizer_json: Path, prompt_len: int) -> str:
    """English text that fxport's tokenizer encodes to ``prompt_len`` ids with BOS (the runner takes
    text, not ids; it may split the cut end differently by a token: its Stats count what it ran)."""
    from fxport.models.gemma4.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(tokenizer_json).parent)
    ids = tokenizer.encode(BENCH_TEXT * (prompt_len // 8 + 1), add_bos=False)[:max(prompt_len - 1, 1)]
    return tokenizer.decode(ids)


def bench_stock_runner(runner: StockRunner, prompt_len: int, new_tokens: int, warmup: int = 1,
                       min_seconds: float = 0.05, max_runs: int = 200) -> dict[str, float]:
    """Prefill and decode tok/s of ExecuTorch's runner from its own ``Stats`` (after ``warmup`` runs).

    The runner's clock counts whole milliseconds, so a phase shorter than that reads 0: runs are
    repeated until each phase has summed ``min_seconds`` (one run for a real model; the
    difference of two truncated timestamps is unbiased, so the sums are too)."""
    prompt = bench_prompt(runner.tokenizer, prompt_len)
    for _ in range(warmup):
        runner.generate(prompt, new_tokens)
    prefill_s = decode_s = 0.0
    prompt_tokens = steps = runs = 0
    while runs < max_runs and (runs == 0 or min(prefill_s, decode_s) < min_seconds):
        g = runner.generate(prompt, new_tokens)
        prefill_s, decode_s = prefill_s + g.prefill_s, decode_s + g.decode_s
        prompt_tokens, steps, runs = prompt_tokens + g.prompt_tokens, steps + g.generated_tokens, runs + 1
    nan = float("nan")
    return {"prefill_tok_s": prompt_tokens / prefill_s if prefill_s else nan,
            "decode_tok_s": steps / decode_s if decode_s and steps else nan,
            "prompt_len": g.prompt_tokens, "new_tokens": len(g.pieces), "runs": runs}
