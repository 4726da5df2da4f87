"""Quality of fxport's quantized Gemma 3 270M against the fp32 reference and llama.cpp.

Reference: the Gemma 3 270M Q4_K_M GGUF dequantized to float32 (fxport's eager model; the
GGUF holds the only weights there are). Every variant is scored on the same token windows:

* texts: two license texts shipped with the OS (``/usr/share/common-licenses/Apache-2.0`` =
  text A, ``/usr/share/common-licenses/MPL-2.0`` = text B; Debian's ``base-files`` package),
  the first ``--tokens`` (2,044) tokens of each, tokenized by the GGUF's own tokenizer
  (fxport's); every runtime, llama.cpp included, is fed these same token ids. The two
  tokenizers are compared on the texts and the result printed: they differ only where the
  license texts center headings with long runs of spaces (split into different space tokens);
* windows: ``[BOS] + 511 text tokens`` (512 positions, no overlap), every position scored;
* perplexity per text; mean KL(reference || variant) in nats and top-1 agreement (the variant's
  argmax equals the reference's) over all scored positions of both texts;
* bytes read per decode token: every linear weight (the tied head counted once, as the head)
  at its stored width (int4 g32 + bf16 group scales, int8 + fp32 per-channel scales, fp32),
  plus one embedding row; llama.cpp: the GGUF's tensor bytes of the same weights.

Runtimes: ``fxport eager <recipe>`` (torchao's emulation of the XNNPACK numerics, one forward
per window with all-position logits), ``fxport .pte`` (the program's ``decode`` method
teacher-forced, one token per call: exactly what generation runs), llama.cpp through
llama-cpp-python (``logits_all=True``, one ``eval`` per window; install: see ``LLAMACPP_INSTALL``).

    .venv/bin/python bench/quality.py [--eager fp32 8da4w default balanced] [--pte build/x.pte ...] [--llamacpp]

The reference log-probabilities are cached (fp16) under ``build/quality/``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TEXTS = {"A": Path("/usr/share/common-licenses/Apache-2.0"), "B": Path("/usr/share/common-licenses/MPL-2.0")}
WINDOW = 512
N_TOKENS = 2044  # 4 windows of 511 text tokens
CACHE = Path(__file__).resolve().parent.parent / "build" / "quality"

LLAMACPP_INSTALL = (
    "llama-cpp-python is not installed; install the peer with (builds llama.cpp, ~10 min on 2 cores; "
    "the AMX flags avoid a fault at the first eval on CPUs that advertise AMX):\n"
    "  CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
    ".venv/bin/pip install -e '.[llamacpp]'"
)


def load_llamacpp(gguf: Path, n_ctx: int, threads: int, logits_all: bool, n_batch: int | None = None):
    """``llama_cpp.Llama`` on ``gguf``; SystemExit with the install command when it is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(LLAMACPP_INSTALL) from None
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


# ----------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Token windows of each text: ``{"A": [[bos, t0, ..., t510], ...], "B": [...]}``."""

    windows: dict[str, list[list[int]]]
    sources: dict[str, str]

    def key(self) -> str:
        h = hashlib.sha1(repr(sorted(self.windows.items())).encode()).hexdigest()[:12]
        return h

    def positions(self) -> int:
        return sum(len(w) - 1 for ws in self.windows.values() for w in ws)


def build_corpus(tokenizer, n_tokens: int = N_TOKENS, window: int = WINDOW, texts: dict[str, Path] = TEXTS) -> Corpus:
    """Tokenize the texts (no BOS), keep ``n_tokens`` of each, cut into ``[BOS] + window-1`` windows."""
    out, sources = {}, {}
    for name, path in texts.items():
        if not path.is_file():
            raise SystemExit(f"quality: text {name} ({path}) is missing; install Debian's base-files or pass other texts")
        ids = tokenizer.encode(path.read_text(), add_bos=False)
        if len(ids) < n_tokens:
            raise SystemExit(f"quality: {path} has {len(ids)} tokens, fewer than --tokens {n_tokens}")
        ids = ids[:n_tokens]
        step = window - 1
        out[name] = [[tokenizer.bos_id] + ids[s:s + step] for s in range(0, len(ids), step)]
        sources[name] = str(path)
    return Corpus(out, sources)


def check_tokenizers(tokenizer, llm, texts: dict[str, Path] = TEXTS) -> str:
    """Compare fxport's and llama.cpp's token ids on the texts; a line saying where they differ.

    The scores do not depend on it: every runtime is fed fxport's ids.
    """
    out = []
    for name, path in texts.items():
        text = path.read_text()
        ours = tokenizer.encode(text, add_bos=False)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if ours == theirs:
            out.append(f"text {name}: identical ({len(ours)} tokens)")
            continue
        same_prose = tokenizer.encode(" ".join(text.split()), add_bos=False) == llm.tokenize(
            " ".join(text.split()).encode("utf-8"), add_bos=False, special=False)
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        out.append(f"text {name}: differ ({len(ours)} vs {len(theirs)} tokens, first at token {i}: fxport "
                   f"{ours[i:i + 2]} = {tokenizer.decode(ours[i:i + 2])!r}, llama.cpp {theirs[i:i + 2]}); "
                   f"with whitespace runs collapsed: {'identical' if same_prose else 'still different'}")
    return "tokenizers: " + "; ".join(out) + " (all runtimes score fxport's ids)"


# ----------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """Running sums over scored positions."""

    nll: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    kl: float = 0.0
    agree: int = 0
    positions: int = 0

    def add(self, text: str, ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """ref_logp (n, V) reference log-probs; logits (n, V) the variant's; targets (n,)."""
        for s in range(0, targets.numel(), 64):
            lr = ref_logp[s:s + 64].float()
            lq = torch.log_softmax(logits[s:s + 64].float(), dim=-1)
            t = targets[s:s + 64]
            self.nll[text] = self.nll.get(text, 0.0) - float(lq.gather(1, t[:, None]).sum())
            self.count[text] = self.count.get(text, 0) + t.numel()
            self.kl += float((lr.exp() * (lr - lq)).sum())
            self.agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            self.positions += t.numel()

    def ppl(self, text: str) -> float:
        return math.exp(self.nll[text] / self.count[text])

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.positions, 1)

    @property
    def agreement(self) -> float:
        return self.agree / max(self.positions, 1)


def eager_logits(model, window: list[int]) -> torch.Tensor:
    """(n, V) float32 logits of an fxport eager model over one window (one forward)."""
    with torch.no_grad():
        if hasattr(model, "reset_caches"):
            model.reset_caches()
        return model(torch.tensor([window]), torch.arange(len(window)))[0].float()


def pte_logits(backend, window: list[int]) -> torch.Tensor:
    """(n, V) logits of a ``.pte``'s ``decode`` method, teacher-forced one token per call."""
    backend.reset()
    rows = [backend.decode(torch.tensor([[t]]), torch.tensor([p]))[0, -1].clone() for p, t in enumerate(window)]
    return torch.stack(rows).float()


def llamacpp_logits(llm, window: list[int]) -> torch.Tensor:
    """(n, V) logits of llama.cpp (``logits_all=True``) over one window (one ``eval``)."""
    import numpy as np

    llm.reset()
    llm.eval(window)
    return torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32))


def reference_logp(corpus: Corpus, reference, gguf: Path) -> dict[str, list[torch.Tensor]]:
    """Reference log-probs per window ((n-1, V) fp16), cached under build/quality/."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"ref-{gguf.stat().st_size}-{corpus.key()}.pt"
    if path.is_file():
        return torch.load(path)
    if reference is None:
        return None
    out = {}
    for text, ws in corpus.windows.items():
        out[text] = [torch.log_softmax(eager_logits(reference, w)[:-1], dim=-1).half() for w in ws]
    torch.save(out, path)
    return out


def score(corpus: Corpus, ref: dict[str, list[torch.Tensor]], logits_fn) -> tuple[Score, float]:
    """Score one runtime (``logits_fn(window) -> (n, V)``); returns (Score, seconds)."""
    sc = Score()
    t0 = time.perf_counter()
    for text, ws in corpus.windows.items():
        for w, lr in zip(ws, ref[text]):
            logits = logits_fn(w)
            sc.add(text, lr, logits[: len(w) - 1], torch.tensor(w[1:]))
    return sc, time.perf_counter() - t0


# ----------------------------------------------------------------------------- bytes per token


def linear_bytes(model) -> int:
    """Bytes one decode step reads: every linear weight once at its stored width + one embedding row.

    int4 group-wise: 0.5 byte/weight + 2 bytes (bf16, as XNNPACK packs qb4w) per group scale;
    int8 per-channel: 1 byte/weight + 4 bytes per channel; float: its element size. A
    quantized embedding reads one row (codes + its scales).
    """
    from torch import nn

    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight
            if id(w) in seen:
                continue
            seen.add(id(w))
            total += tensor_bytes(w)
    emb = model.model.embed_tokens
    row = getattr(emb, "row_bytes", None)
    total += row() if callable(row) else emb.weight.shape[1] * emb.weight.element_size()
    return total


def tensor_bytes(w) -> int:
    qdata = getattr(w, "qdata", None)
    if qdata is None:
        return w.numel() * w.element_size()
    bits = 4 if getattr(w, "target_dtype", None) == torch.int4 else 8
    scale = w.scale
    per_channel = scale.numel() == qdata.shape[0]
    return qdata.numel() * bits // 8 + scale.numel() * (4 if per_channel else 2)


def gguf_bytes(gguf: Path) -> int:
    """Bytes llama.cpp reads per token: the GGUF's linear weights (tied head = the embedding tensor)."""
    from fxport.models.gemma4.load import iter_gguf_tensors

    return sum(t.nbytes for t in iter_gguf_tensors(gguf) if len(t.shape) == 2)


# ----------------------------------------------------------------------------- variants


def eager_variant(reference, recipe: str, tokenizer):
    """A deep copy of ``reference`` quantized with XNNPACK recipe ``recipe`` ('fp32': unchanged);
    ``tokenizer`` encodes the calibration text of recipes that smooth activations."""
    import copy

    from fxport.lowering.xnnpack_quant import quantize_for_xnnpack

    model = copy.deepcopy(reference)
    if recipe != "fp32":
        quantize_for_xnnpack(model, recipe, tokenizer=tokenizer)
    return model.eval()


def header(corpus: Corpus, load0) -> str:
    la = os.getloadavg()
    return (f"texts: A = {corpus.sources['A']}, B = {corpus.sources['B']}; {corpus.positions()} scored positions "
            f"({WINDOW}-token windows, BOS + 511); load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} "
            f"(at start {load0[0]:.2f}); threads {torch.get_num_threads()}")


def row(label: str, sc: Score | None, nbytes: int | None, extra: str = "") -> str:
    if sc is None:
        return f"| {label} | — | — | — | — | — |{extra}"
    mb = f"{nbytes / 1e6:,.0f} MB" if nbytes else "—"
    return (f"| {label} | {sc.ppl('A'):.2f} | {sc.ppl('B'):.2f} | {sc.mean_kl:.3f} | {100 * sc.agreement:.1f}% | "
            f"{mb} |{extra}")


TABLE_HEAD = ("| variant | perplexity A | perplexity B | mean KL to ref | top-1 agreement | bytes read / token |\n"
              "|---|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eager", nargs="*", default=["fp32", "8da4w", "8da8w", "default"],
                   help="fxport eager variants: 'fp32' or XNNPACK recipe names")
    p.add_argument("--pte", nargs="*", default=[], type=Path, help=".pte files (decode method, teacher-forced)")
    p.add_argument("--llamacpp", action="store_true", help="also score llama.cpp on the same GGUF")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=N_TOKENS)
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    torch.set_num_threads(args.threads)

    from fxport.models.gemma4.load import gemma3_270m_gguf, load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer

    gguf = gemma3_270m_gguf()
    reference, tok_src = load_model(gguf, max_seq_len=WINDOW, progress=False)
    reference.eval()
    tokenizer = load_tokenizer(tok_src)
    corpus = build_corpus(tokenizer, args.tokens)
    ref = reference_logp(corpus, reference, gguf)
    rows = [TABLE_HEAD, row("reference fp32 (GGUF dequantized)", _self_score(corpus, ref), linear_bytes(reference))]
    notes = []
    if args.llamacpp:
        llm = load_llamacpp(gguf, WINDOW, args.threads, logits_all=True)
        notes.append(check_tokenizers(tokenizer, llm))
        sc, dt = score(corpus, ref, lambda w: llamacpp_logits(llm, w))
        rows.append(row("llama.cpp, same Q4_K_M GGUF", sc, gguf_bytes(gguf)))
        del llm
    for recipe in args.eager:
        if recipe == "fp32":
            continue
        model = eager_variant(reference, recipe, tokenizer)
        sc, dt = score(corpus, ref, lambda w: eager_logits(model, w))
        rows.append(row(f"fxport eager {recipe}", sc, linear_bytes(model)))
        print(rows[-1], f"({dt:.0f} s)", file=sys.stderr, flush=True)
        del model
    for pte in args.pte:
        import executorch.kernels.quantized  # noqa: F401  (quantized embedding kernels)

        from fxport.runtime.pte_backend import PteBackend

        backend = PteBackend(pte, num_threads=args.threads)
        sc, dt = score(corpus, ref, lambda w: pte_logits(backend, w))
        rows.append(row(f"fxport .pte {pte.name} (decode, teacher-forced)", sc, _pte_bytes(pte)))
        print(rows[-1], f"({dt:.0f} s)", file=sys.stderr, flush=True)
    print(header(corpus, load0))
    print("\n".join(rows))
    for n in notes:
        print(n)
    return 0


def _self_score(corpus: Corpus, ref) -> Score:
    sc = Score()
    for text, ws in corpus.windows.items():
        for w, lr in zip(ws, ref[text]):
            sc.add(text, lr, lr.float(), torch.tensor(w[1:]))
    return sc


def _pte_bytes(pte: Path) -> int | None:
    """Bytes per token recorded next to the program by ``bench/e2e_cpu.py`` (``<pte>.bytes``)."""
    side = pte.with_suffix(".bytes")
    return int(side.read_text()) if side.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
