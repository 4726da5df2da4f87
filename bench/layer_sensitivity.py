"""Per-layer sensitivity to 4-bit weights: which decoder layers a mixed int4 / int8 recipe should
keep at 8 bits, measured rather than assumed (it chose the 8-bit layers of the ``fast`` recipe,
dropped on 2026-12-05: int4 costs more than 5% perplexity on Gemma 3 270M).

    .venv/bin/python bench/layer_sensitivity.py [--windows 1] [--keep 4]

For each decoder layer ``i`` of Gemma 3 270M: a copy of the fp32 reference with only layer
``i``'s q/k/o and MLP linears quantized as ``fast`` did (int4 g32 on torchao's HQQ
grid, RTN rounding: GPTQ would lower every row alike), everything else float; scored against
the reference on the first ``--windows`` window(s) of each bench/quality.py text (mean KL and
top-1 agreement). Prints one row per layer and the ``--keep`` most sensitive layers.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=1, help="windows of each text scored (512 tokens each)")
    p.add_argument("--keep", type=int, default=4, help="how many of the most sensitive layers to name")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()

    from fxport.lowering.xnnpack_quant import INT4_G32_HQQ, XnnpackRecipe, quantize_for_xnnpack
    from fxport.models.gemma4.load import gemma3_270m_gguf, load_model
    from fxport.models.gemma4.tokenizer import load_tokenizer

    gguf = gemma3_270m_gguf()
    reference, tok_src = load_model(gguf, max_seq_len=Q.WINDOW, progress=False)
    reference.eval()
    corpus = Q.build_corpus(load_tokenizer(tok_src))
    ref = Q.reference_logp(corpus, reference, gguf)
    corpus = Q.Corpus({t: ws[:args.windows] for t, ws in corpus.windows.items()}, corpus.sources)
    ref = {t: lr[:args.windows] for t, lr in ref.items()}

    linears = r"(self_attn\.(q|k|o)_proj|mlp\.(gate|up|down)_proj)\.weight"
    rows = []
    for i in range(reference.config.num_hidden_layers):
        recipe = XnnpackRecipe(f"layer{i}-int4", ((rf".*layers\.{i}\.{linears}", INT4_G32_HQQ),))
        model = copy.deepcopy(reference).eval()
        quantize_for_xnnpack(model, recipe)
        t0 = time.perf_counter()
        sc, _ = Q.score(corpus, ref, lambda w, m=model: Q.eager_logits(m, w))
        rows.append((i, sc.mean_kl, sc.agreement))
        print(f"layer {i:2d}: KL {sc.mean_kl:.4f}, top-1 {100 * sc.agreement:.1f}% ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        del model
    la = os.getloadavg()
    print(f"{corpus.positions()} scored positions ({args.windows} window(s) of each text); only layer i's q/k/o and "
          f"MLP int4 g32 HQQ (RTN), the rest fp32; load average {load0[0]:.2f} at start, {la[0]:.2f} at end")
    print("| layer | mean KL to ref | top-1 agreement |\n|---:|---:|---:|")
    for i, kl, agree in rows:
        print(f"| {i} | {kl:.4f} | {100 * agree:.1f}% |")
    worst = sorted(rows, key=lambda r: -r[1])[:args.keep]
    print(f"most sensitive: {', '.join(str(i) for i, _, _ in sorted(worst))} "
          f"(sum of their KL {sum(kl for _, kl, _ in worst):.4f} of {sum(kl for _, kl, _ in rows):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
