"""What ExecuTorch plans for the runner layout's vision_encoder at a real vision tower's size.

ExecuTorch plans every tensor outside XNNPACK at its upper bound, so a method with dynamic
shapes can plan far more than one call uses. This builds, with random weights, transformers'
default Gemma 4 vision config (hidden 768, 16 layers, patch 16, pooling 3) on a tiny text decoder
in the runner layout (``fxport.builder.multimodal.export_runner_multimodal_pte``, 280 soft tokens,
32 cells a side), then prints per method the planned bytes, the delegation, and for one
768 x 816 image (16 x 17 cells = 272 soft tokens) the encode time in ExecuTorch and the largest
difference from the eager method.

    .venv/bin/python bench/runner_vision_memory.py [--out build/runner_vision.pte]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/runner_vision.pte")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from transformers import Gemma4VisionConfig
    from executorch.runtime import Runtime

    from fxport.builder.multimodal import export_runner_multimodal_pte
    from fxport.models.gemma4.runner_methods import VisionEncoder
    from fxport.tests.models.multimodal_helpers import hf_multimodal_config, hf_text_config, pair

    vision = Gemma4VisionConfig()
    vision._attn_implementation = "eager"
    hf, model = pair(hf_multimodal_config(hf_text_config(bidir="vision"), vision), seed=1, max_seq_len=512)
    del hf
    t = time.perf_counter()
    lowered = export_runner_multimodal_pte(model, args.out, max_prefill_chunk=282, max_soft_tokens=280)
    print(f"build {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.1f})")
    print(f"{'method':<16} {'planned MB':>11}  delegation")
    for plan in lowered.executorch_program.execution_plan:
        if plan.name in lowered.methods:
            line = lowered.report.methods[plan.name].summary().splitlines()[0] if hasattr(
                lowered.report.methods[plan.name], "summary") else ""
            print(f"{plan.name:<16} {sum(plan.non_const_buffer_sizes) / 1e6:>11.1f}  {line}")
    method = Runtime.get().load_program(args.out).load_method("vision_encoder")
    image = torch.randint(0, 256, (3, 768, 816), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = method.execute([image])[0]
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        method.execute([image])
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        ref = VisionEncoder(model, 280)(image)
    print(f"vision_encoder {tuple(out.shape)}: median encode {statistics.median(times):.2f} s over {args.reps} "
          f"(default threads, load {os.getloadavg()[0]:.1f}); max |ExecuTorch - eager| "
          f"{float((out - ref).abs().max()):.4f} of max |eager| {float(ref.abs().max()):.2f}")


if __name__ == "__main__":
    main()
