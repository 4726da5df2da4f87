"""Does a shortlist output head pay on this CPU? Speed of the head alone in ExecuTorch, and the
quality of the shortlist on the real Gemma 3 270M.

A shortlist head: a cheap int4 copy of the 262144 x 640 output head ranks the vocabulary, the
top k are rescored exactly from the int8 table the program already holds (the ``balanced``
lookup table), and the exact logits are scattered into the cheap ones. It reads ~84 MB of int4
(+ scales) per token instead of the int8 head's 168 MB, plus a top-k over 262144 logits and k
rows of the table.

    .venv/bin/python bench/shortlist_head.py [--k 16 64] [--rounds 10] [--quality]

Speed (default): programs holding only the head, lowered with XNNPACK (random weights of the
real shape), timed interleaved in blocks, medians of wall time and of process CPU time (the CPU
time is the steadier figure on a shared machine), next to a ``balanced`` decode step when
``build/gemma3-270m-balanced.pte`` exists:

* ``int8 head``: what ``balanced`` runs (8da8w, XNNPACK ``QC8W``);
* ``int4 g32 head`` / ``int4 per-channel head``: the cheap ranker alone (XNNPACK ``QB4W``);
* ``shortlist kK``: int4 ranker (per-channel or g32) + top-k (flat ``topk`` over 262144, or two-level:
  block maxima, the top k blocks, ``topk`` inside them: the same indices) + k int8 rows
  dequantized, dotted with the activations and scattered;
* ``topk kK``: ExecuTorch's portable top-k over 262144 logits alone.

``--quality``: the ``balanced`` recipe in eager (torchao's emulation of XNNPACK's numerics) on
bench/quality.py's texts; the head's input is captured and the variants computed from it: the
plain int8 head, each cheap head alone, and the shortlist at each k (the top-k logits taken from
the plain head: what an exact rescoring produces). Perplexity per text, mean KL to the fp32
reference, top-1 agreement with it, and how often the greedy token equals the plain head's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "shortlist"
V, D, BLOCK = 262144, 640, 512


def int8_table(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes (V, D) and scales (V,) of ``w``."""
    scales = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8), scales


def int4_linear(w: torch.Tensor, group: int | None) -> nn.Linear:
    """An 8da4w torchao linear of ``w`` (``group`` None: per output channel)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_
    from torchao.quantization.quant_primitives import MappingType

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    quantize_(lin, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerAxis(0) if group is None else PerGroup(group),
        weight_mapping_type=MappingType.SYMMETRIC))
    return lin


def int8_linear(w: torch.Tensor) -> nn.Linear:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
    from torchao.quantization.quant_primitives import MappingType

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    quantize_(lin, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0),
                                                         weight_mapping_type=MappingType.SYMMETRIC))
    return lin


def topk_two_level(scores: torch.Tensor, k: int, block: int = BLOCK) -> torch.Tensor:
    """Indices (1, k) of the k largest of ``scores`` (1, V) (V a multiple of ``block``): the top k
    blocks by their maximum hold every top-k element (each block outside them has k blocks whose
    maximum beats its own), so a top-k inside them gives the flat top-k's indices (ties aside)."""
    blocks = scores.reshape(-1, block)  # (V / block, block)
    _, bidx = torch.topk(blocks.amax(dim=-1), k)  # (k,)
    _, j = torch.topk(blocks.index_select(0, bidx).reshape(-1), k)  # (k,)
    return (bidx.index_select(0, j // block) * block + j % block).reshape(1, k)


class ShortlistHead(nn.Module):
    """cheap = int4 head(x); the top k of cheap rescored from the int8 table; scattered back."""

    def __init__(self, w: torch.Tensor, k: int, two_level: bool, group: int | None):
        super().__init__()
        self.k, self.two_level = k, two_level
        self.cheap = int4_linear(w, group)
        codes, scales = int8_table(w)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (1, D) -> (1, V)
        cheap = self.cheap(x)
        idx = topk_two_level(cheap, self.k) if self.two_level else torch.topk(cheap, self.k, dim=-1)[1]
        i = idx.reshape(-1)
        rows = self.codes.index_select(0, i).to(torch.float32) * self.scales.index_select(0, i)[:, None]  # (k, D)
        return cheap.scatter(-1, idx, x @ rows.t())


class TopK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x, self.k, dim=-1)[1]


def lower(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if not path.is_file():
        ep = torch.export.export(module, (example,))
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            prog.write_to_file(f)
        tmp.replace(path)
    return path


def speed(ks: list[int], rounds: int, threads: int) -> None:
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    from fxport.runtime.pte_backend import PteBackend, set_num_threads

    torch.manual_seed(0)
    w = torch.randn(V, D) * 0.05
    x = torch.randn(1, D)
    progs = {"int8 head (balanced)": lower(int8_linear(w), x, OUT / "head_int8.pte"),
             "int4 g32 head": lower(int4_linear(w, 32), x, OUT / "head_int4_g32.pte"),
             "int4 per-channel head": lower(int4_linear(w, None), x, OUT / "head_int4_pc.pte")}
    for k in ks:
        for group, g in ((None, "per-channel"), (32, "g32")):
            progs[f"shortlist k{k}, int4 {g}, two-level topk"] = lower(ShortlistHead(w, k, True, group), x,
                                                                        OUT / f"shortlist_k{k}_{g}_two.pte")
        progs[f"shortlist k{k}, int4 per-channel, flat topk"] = lower(ShortlistHead(w, k, False, None), x,
                                                                       OUT / f"shortlist_k{k}_per-channel_flat.pte")
        progs[f"topk k{k} over {V}"] = lower(TopK(k), torch.randn(1, V), OUT / f"topk_k{k}.pte")
    set_num_threads(threads)
    torch.set_num_threads(1)
    runs = {}
    for name, path in progs.items():
        method = Runtime.get().load_program(path).load_method("forward")
        arg = [torch.randn(1, V)] if name.startswith("topk") else [x]
        runs[name] = (lambda m=method, a=arg: m.execute(a))
    step_pte = ROOT / "build" / "gemma3-270m-balanced.pte"
    if step_pte.is_file():
        backend = PteBackend(step_pte, num_threads=threads)
        backend.prefill(torch.randint(100, 1000, (1, 128)), torch.arange(128))
        runs["balanced decode step (270M)"] = lambda: backend.decode(torch.tensor([[1000]]), torch.tensor([200]))
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    la0 = os.getloadavg()
    for rnd in range(rounds + 1):  # round 0: warm-up
        for name, run in runs.items():
            for i in range(10):
                c0, t0 = time.process_time(), time.perf_counter()
                run()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rnd and i >= 2:
                    wall[name].append(dt)
                    cpu[name].append(dc)
    la1 = os.getloadavg()
    base_w, base_c = statistics.median(wall["int8 head (balanced)"]), statistics.median(cpu["int8 head (balanced)"])
    print(f"head {V} x {D}, {threads} ExecuTorch threads, {rounds} rounds x 8 calls, interleaved; "
          f"load average {la0[0]:.2f} -> {la1[0]:.2f}")
    print("| program | file MB | wall ms (median) | CPU ms (median) | CPU vs int8 head |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        path = progs.get(name)
        size = f"{path.stat().st_size / 1e6:.0f}" if path else "—"
        w_ms, c_ms = 1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name])
        print(f"| {name} | {size} | {w_ms:.2f} | {c_ms:.2f} | {c_ms / (1e3 * base_c):.2f}x |")
    print(f"(wall of the int8 head {1e3 * base_w:.2f} ms)")


def quality(ks: list[int], threads: int) -> None:
    import copy

    sys.path.insert(0, str(ROOT / "bench"))
    import quality as Q

    from fxport.lowering.xnnpack_quant import quantize_for_xnnpack
    from fxport.models.gemma4.load import gemma3_270m_gguf, load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    gguf = gemma3_270m_gguf()
    reference, tok_src = load_model(gguf, max_seq_len=Q.WINDOW, progress=False)
    tokenizer = load_tokenizer(tok_src)
    corpus = Q.build_corpus(tokenizer)
    ref = Q.reference_logp(corpus, reference, gguf)
    model = copy.deepcopy(reference)
    del reference
    quantize_for_xnnpack(model, "balanced", tokenizer=tokenizer)
    model.eval()
    table = model.lm_head.weight.dequantize()  # (V, D): the int8 table the program holds
    cheaps = {"int4 g32": int4_linear(table, 32), "int4 per-channel": int4_linear(table, None)}
    seen = {}
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.update(h=inp[0].detach(), plain=out.detach()))
    names = ["plain int8 head"] + [f"{c} alone" for c in cheaps] + [f"{c} shortlist k{k}" for c in cheaps for k in ks]
    scores = {n: Q.Score() for n in names}
    same = dict.fromkeys(names, 0)
    positions = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for text, windows in corpus.windows.items():
            for window, ref_logp in zip(windows, ref[text]):
                n = len(window) - 1
                logits = {"plain int8 head": Q.eager_logits(model, window)[:n]}
                h, plain = seen["h"][0, :n], seen["plain"][0, :n].float()
                for c, lin in cheaps.items():
                    cheap = lin(h).float()
                    logits[f"{c} alone"] = cheap
                    for k in ks:
                        idx = cheap.topk(k, dim=-1).indices
                        logits[f"{c} shortlist k{k}"] = cheap.scatter(-1, idx, plain.gather(-1, idx))
                top = logits["plain int8 head"].argmax(-1)
                target = torch.tensor(window[1:])
                for name, lg in logits.items():
                    scores[name].add(text, ref_logp, lg, target)
                    same[name] += int((lg.argmax(-1) == top).sum())
                positions += n
    print(f"quality: {positions} positions of bench/quality.py's texts, {time.perf_counter() - t0:.0f} s "
          "(the model has no final logit softcapping: logits are the head's output)")
    print("| head | ppl A | ppl B | mean KL to fp32 | top-1 vs fp32 | greedy = plain int8 head |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        s = scores[name]
        print(f"| {name} | {s.ppl('A'):.3f} | {s.ppl('B'):.3f} | {s.mean_kl:.4f} | {100 * s.agreement:.1f}% | "
              f"{100 * same[name] / positions:.2f}% |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[16, 64], help="shortlist sizes")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="also score the shortlist on the real 270M (slow: ~30 min)")
    args = p.parse_args(argv)
    speed(args.k, args.rounds, args.threads)
    if args.quality:
        quality(args.k, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
