"""PteBackend: run a fxport ``.pte`` (method ``prefill``, and ``decode`` when it has one) with ExecuTorch.

The backend protocol of :mod:`fxport.runtime.backend`:

    backend.max_seq_len          # positions the KV cache holds
    backend.max_prefill_chunk    # longest token chunk one ``prefill`` call accepts
    backend.prefill(tokens, input_pos) -> logits   # tokens (1, L) int64, input_pos (L,) int64
    backend.decode(token, input_pos) -> logits     # token (1, 1) int64, input_pos (1,) int64
    backend.reset()                                # start a new sequence

Logits are float32 ``(1, L', vocab)``; ``L'`` is 1 when the program was exported with
last-token logits (fxport's default for prefill), else L. The caller reads ``[:, -1]``.

A program without a ``decode`` method (fxport's XNNPACK programs: prefill's L is dynamic in
[1, max_prefill_chunk]) runs each decode step as a prefill of one token. A program with both
methods has them read and write one KV-cache allocation (the ``.pte`` was planned with
``share_mutable_buffers=True`` and the Python runtime gives host-only methods one set of
arenas), so a ``decode`` after a ``prefill`` sees the prompt. The cache's initial content is
whatever the allocation held: every position a query can see is written before it is read
(causal masks, ring buffers mask unwritten slots), so ``reset`` only rewinds bookkeeping.

torch's own ops run on the calling thread while a method executes and, through
:meth:`PteBackend.step_context`, while the generate loop samples (:func:`torch_ops_inline`):
torch's OpenMP workers spin for milliseconds after each parallel op and take a core from
ExecuTorch's threadpool (a decode step of the 270M went from 7.5 to 10.6-18 ms on 2 cores).

Metadata comes from the constant methods of ExecuTorch's LLM-runner contract
(:mod:`fxport.contract`), read with the runner's meaning: ``get_max_seq_len`` is the longest
prefill chunk, ``get_max_context_len`` the KV positions, ``get_eos_ids`` the ids that end
generation. A program from before that contract (``get_max_prefill_chunk``, no
``get_max_context_len``) is refused with a one-line hint to re-export it.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path
from typing import Any, Iterator

import torch

from fxport import contract
from fxport.fileio import weights_file
from fxport.runtime.backend import PteError, check_token_ids, constant_value

METADATA_METHODS = contract.CONSTANT_METHODS
VERIFY = contract.VERIFY


def set_num_threads(n: int) -> None:
    """Size ExecuTorch's CPU threadpool (XNNPACK and the portable kernels) to ``n`` threads."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(n))


@contextlib.contextmanager
def one_openmp_level() -> Iterator[None]:
    """Every OpenMP parallel region of the process runs on one thread inside the block
    (libgomp's process-wide ``max-active-levels`` set to 0, restored after; no-op without libgomp).

    ExecuTorch's ``llama::custom_sdpa`` (programs fxport builds for XNNPACK by default) splits heads over
    ExecuTorch's threadpool and runs a GEMM per part that OpenMP threads inside each worker. The
    parts then summed in an order that depended on the run: the 270M's first logits took one of
    two values (22.5 apart) in 2-4 of 6 processes, in fxport's runtime and in the stock runner.
    With one level the GEMMs run on their own thread: 18 of 18 processes agreed (2 threads, with
    and without ``torch.set_num_threads(1)`` first). A native runner gets the same with
    ``OMP_NUM_THREADS=1``. Programs without the kernel run no OpenMP region: no change.
    """
    gomp = _libgomp()
    levels = gomp.omp_get_max_active_levels() if gomp is not None else 0
    if levels:
        gomp.omp_set_max_active_levels(0)
    try:
        yield
    finally:
        if levels:
            gomp.omp_set_max_active_levels(levels)


@functools.cache
def _libgomp():
    """libgomp (the OpenMP runtime torch loads and ExecuTorch's kernels share), or None."""
    import ctypes

    try:
        lib = ctypes.CDLL("libgomp.so.1")
        lib.omp_get_max_active_levels.restype = ctypes.c_int
        lib.omp_set_max_active_levels.argtypes = [ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def torch_ops_inline() -> Iterator[None]:
    """torch's CPU ops on the calling thread inside the block (``torch.set_num_threads(1)``,
    restored after; no-op when already 1).

    torch's parallel ops run on an OpenMP team whose workers keep spinning after each op (libgomp's
    default wait policy, milliseconds). Beside ExecuTorch's own threadpool that spin takes a core
    from XNNPACK's next operators: on 2 cores the pybindings' copy of the 262144 logits (1 MB,
    one parallel op) and the sampler's argmax made a 7.5 ms decode step of the 270M take
    10.6-18 ms. On one thread those ops cost ~0.1 ms. The setting is process-wide: another
    Python thread running torch ops meanwhile runs them on one thread too. The block also holds
    :func:`one_openmp_level` (the methods run inside it).
    """
    with one_openmp_level():
        n = torch.get_num_threads()
        if n == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


class PteBackend:
    """A loaded ``.pte`` with ``prefill`` / ``decode`` methods (see the module docstring).

    path: the ``.pte`` file; data_path: its ``.ptd`` weights file when it has one (default:
        ``<stem>.ptd`` beside the ``.pte`` when that exists, as fxport's XNNPACK programs with a
        shared embedding table write it; CUDA programs name theirs explicitly).
    num_threads: ExecuTorch threadpool size (None: leave as is).
    verbose: show the runtime's native log lines (cpuinfo probing, ...); by default they are
        captured (:mod:`fxport.runtime.native_log`) and only shown inside a load error.
        ``FXPORT_VERBOSE=1`` sets the default.
    Raises PteError for a missing file, a file ExecuTorch cannot load, or a program without a
    ``prefill`` method.
    """

    def __init__(self, path: str | Path, *, data_path: str | Path | None = None, num_threads: int | None = None,
                 verbose: bool | None = None):
        path = Path(path)
        if not path.is_file():
            raise PteError(f"no such .pte file: {path}")
        with path.open("rb") as f:
            header = f.read(8)
        if len(header) < 8 or header[4:6] != b"ET":  # flatbuffer file identifier "ET12" at byte 4
            raise PteError(f"{path} is not a loadable ExecuTorch program (no 'ET' file identifier at byte 4)")
        if data_path is None and weights_file(path).is_file():
            data_path = weights_file(path)
        from fxport.runtime.integrity import check_weights

        check_weights(path, data_path)  # a damaged or foreign .ptd: one line, before anything runs
        from executorch.runtime import Runtime

        from fxport.runtime.native_log import capture_native_stderr, verbose_default

        verbose = verbose_default() if verbose is None else verbose
        # The runtime logs to fd 2 (cpuinfo probing on every XNNPACK load, the reason of a failed
        # load): captured here, shown with --verbose or inside the error.
        with capture_native_stderr(verbose) as native:
            if num_threads is not None:
                set_num_threads(num_threads)
            log = io.StringIO()
            missing = []
            try:
                contract.load_llm_kernels()  # embedding_byte, llama::custom_sdpa (fxport.passes.xnnpack.CustomSDPA)
                with contextlib.redirect_stderr(log):
                    self.program = Runtime.get().load_program(path, data_path=data_path)
                    names = self.program.method_names
                    missing = [m for m in ("prefill",) if m not in names]
                    legacy = contract.LEGACY_MARKER in names and contract.MAX_CONTEXT_LEN not in names
                    if not missing and not legacy:
                        self.path = path
                        self.metadata: dict[str, Any] = {m: self._constant(m) for m in METADATA_METHODS}
                        self._prefill = self.program.load_method("prefill")
                        # no decode method: a decode step is a prefill of one token
                        self._decode = self.program.load_method("decode") if "decode" in names else self._prefill
                failure = None
            except Exception as exc:  # the runtime raises RuntimeError with a status code
                failure = exc
        if failure is not None:
            lines = [line for line in native.lines() if "cpuinfo" not in line]
            reason = " ".join((log.getvalue() + " ".join(lines[-2:])).split()) or f"{type(failure).__name__}: {failure}"
            hint = ""
            if data_path is None and "external_data_map is null" in reason:
                hint = (f"; its weights file {weights_file(path).name} is missing: "
                        "copy it beside the .pte or re-export")
            raise PteError(f"{path} is not a loadable ExecuTorch program ({reason}){hint}") from None
        if missing:
            raise PteError(f"{path} has no method(s) {missing} (methods: {sorted(names)}); export it with fxport")
        if legacy:
            raise PteError(f"{path} {contract.REEXPORT_HINT}")
        prefill_in = self.program.metadata("prefill").input_tensor_meta(0).sizes()
        meta = self.metadata
        # The runner's meaning: get_max_seq_len = tokens per call, get_max_context_len = positions.
        self.max_prefill_chunk = int(meta[contract.MAX_SEQ_LEN] or prefill_in[-1])
        self.max_seq_len = int(meta[contract.MAX_CONTEXT_LEN] or 0) or None
        self.vocab_size = meta[contract.VOCAB_SIZE]
        self.bos_id = meta[contract.BOS_ID]
        self.eos_ids = tuple(meta[contract.EOS_IDS] or ())
        # speculative decoding's optional verify method (fxport export --verify-method), loaded on
        # first use: XNNPACK packs its own copy of the weights when a method loads
        self.has_verify, self._verify = VERIFY in self.program.method_names, None

    def _constant(self, name: str) -> Any:
        return constant_value(self.program, name)

    def contract_problems(self) -> list[str]:
        """What keeps ExecuTorch's stock ``TextLLMRunner`` from running this program
        (:func:`fxport.contract.contract_problems`); ``[]`` when nothing does."""
        prog = self.program
        inputs, outputs = {}, {}
        for name in [m for m in (contract.FORWARD, contract.PREFILL, contract.DECODE) if m in prog.method_names]:
            inputs[name], outputs[name] = self.signature(name)
        constants = {k: v for k, v in self.metadata.items() if v is not None}
        return contract.contract_problems(prog.method_names, constants, inputs, outputs)

    def signature(self, method: str) -> tuple[list[tuple[int, tuple]], list[tuple[int, tuple]]]:
        """``(inputs, outputs)`` of ``method``: ``[(ExecuTorch ScalarType, max sizes), ...]`` each."""
        meta = self.program.metadata(method)

        def infos(tensor_meta, count: int) -> list[tuple[int, tuple]]:
            return [(tensor_meta(i).dtype(), tuple(tensor_meta(i).sizes())) for i in range(count)]

        return infos(meta.input_tensor_meta, meta.num_inputs()), infos(meta.output_tensor_meta, meta.num_outputs())

    def prefill(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits for a chunk: tokens (1, L) int64 with 1 <= L <= max_prefill_chunk."""
        return self._run_chunk(self._prefill, "prefill", tokens, input_pos)

    def _run_chunk(self, method: Any, what: str, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``method`` on a chunk of 1..max_prefill_chunk tokens (ids checked first)."""
        L = tokens.shape[-1]
        if not 1 <= L <= self.max_prefill_chunk:
            raise ValueError(f"{what} chunk of {L} tokens; this .pte accepts 1..{self.max_prefill_chunk} per call")
        self._check_ids(tokens)
        with torch_ops_inline():  # the bindings copy the outputs out with a torch op
            return method.execute([tokens.to(torch.long).contiguous(), input_pos.to(torch.long).contiguous()])[0]

    def decode(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits for one token: token (1, 1) int64, input_pos (1,) int64."""
        self._check_ids(token)
        with torch_ops_inline():
            return self._decode.execute([token.to(torch.long).reshape(1, 1), input_pos.to(torch.long).reshape(1)])[0]

    def step_context(self) -> contextlib.AbstractContextManager:
        """What a generate loop holds around its decode steps and their sampling:
        :func:`torch_ops_inline` (see there why)."""
        return torch_ops_inline()

    def verify(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits of every token (1, L, V) (method ``target_verify``, the KV cache ``prefill``
        writes); tokens (1, L) int64 with 1 <= L <= max_prefill_chunk."""
        if not self.has_verify:
            raise PteError(f"{self.path} has no {VERIFY} method; re-export it with --verify-method")
        return self._run_chunk(self.load_verify(), "verify", tokens, input_pos)

    def load_verify(self):
        """Load ``target_verify`` now (~1 s for the 270M: XNNPACK packs its weights) instead of
        inside the first speculative round."""
        if self._verify is None:
            self._verify = self.program.load_method(VERIFY)
        return self._verify

    def _check_ids(self, tokens: torch.Tensor) -> None:
        """TokenIdError before the runtime sees an id outside the vocabulary (it would index past
        the embedding table and fail with an opaque status code)."""
        check_token_ids(tokens, self.vocab_size, f"{self.path} was exported for {self.vocab_size} ids.")

    def reset(self) -> None:
        """Start a new sequence (nothing to clear; see the module docstring)."""

    def __repr__(self) -> str:
        return f"PteBackend({str(self.path)!r}, max_seq_len={self.max_seq_len}, max_prefill_chunk={self.max_prefill_chunk})"


# ----------------------------------------------------------------------------- tools over a .pte


def program_bytes(path: str | Path) -> int:
    """Bytes on disk of the program at ``path``: the ``.pte`` plus its ``<stem>.ptd`` weights, if any."""
    path = Path(path)
    ptd = weights_file(path)
    return path.stat().st_size + (ptd.stat().st_size if ptd.is_file() else 0)


def bench_pte(path: str | Path, prompt_len: int, new_tokens: int, threads: int | None,
              warmup: int = 1, verbose: bool | None = None) -> dict[str, float]:
    """Prefill and decode tok/s of a ``.pte`` on random token ids (no tokenizer needed).

    Raises ValueError when ``prompt_len + new_tokens`` exceeds the program's ``max_seq_len``.
    """
    import time

    backend = PteBackend(path, num_threads=threads, verbose=verbose)
    vocab = backend.vocab_size or 256
    need = prompt_len + new_tokens
    if backend.max_seq_len is not None and need > backend.max_seq_len:
        cap = backend.max_seq_len
        fix = (f"pass --prompt-len {cap - new_tokens} or less" if new_tokens < cap else
               f"pass --new-tokens {cap - prompt_len} or less" if prompt_len < cap else
               f"pass --prompt-len {cap - 1} --new-tokens 1")
        raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {need} tokens exceed the "
                         f"program's max_seq_len {backend.max_seq_len}; {fix}, or re-export with "
                         f"--max-seq-len {need} or more")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, need), generator=g)

    def prefill() -> float:
        t0 = time.perf_counter()
        for s in range(0, prompt_len, backend.max_prefill_chunk):
            e = min(s + backend.max_prefill_chunk, prompt_len)
            backend.prefill(tokens[:, s:e], torch.arange(s, e))
        return time.perf_counter() - t0

    for _ in range(warmup):
        prefill()
    t_prefill = prefill()
    t0 = time.perf_counter()
    for p in range(prompt_len, need):
        backend.decode(tokens[:, p:p + 1], torch.tensor([p]))
    t_decode = time.perf_counter() - t0
    return {"prefill_tok_s": prompt_len / t_prefill, "decode_tok_s": new_tokens / t_decode,
            "prompt_len": prompt_len, "new_tokens": new_tokens}


def describe_pte(path: str | Path) -> str:
    """Methods, metadata and input/output sizes of a fxport ``.pte`` (``fxport dump``)."""
    backend = PteBackend(path)
    prog = backend.program
    lines = [f"# {path}", f"methods: {', '.join(sorted(prog.method_names))}"]
    for key, value in backend.metadata.items():
        if value is not None:
            lines.append(f"{key}: {value}")
    for name in [m for m in ("prefill", "decode") if m in prog.method_names]:
        ins, outs = ([str(sizes) for _, sizes in infos] for infos in backend.signature(name))
        lines.append(f"{name}: inputs {', '.join(ins)} -> outputs {', '.join(outs)} (max sizes)")
    if "decode" not in prog.method_names:
        lines.append("decode: runs through prefill, one token per call")
    problems = backend.contract_problems()
    lines.append("ExecuTorch runner contract: " + ("ok (TextLLMRunner runs it)" if not problems else "; ".join(problems)))
    return "\n".join(lines)
