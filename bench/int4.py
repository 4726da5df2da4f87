"""int4 linear benchmark: fxport's Triton GEMV / dequant+mm vs tinygemm vs dense bf16.

GPU (the figures): every distinct linear shape (N, K) of the Gemma 4 31B preset (read from the
model built on the meta device), group size 32 (``--group``), bf16 activations:

* decode, M = 1: ``fxport::int4_gemv`` (Triton), ``aten._weight_int4pack_mm`` (tinygemm) and a
  dense bf16 ``mm``; microseconds and % of HBM bandwidth (bytes of weight + scales/zeros + x +
  out over time, over ``--peak-gbs``, default from the device name: H100 3350, H200 4800 GB/s).
  Goal: >= 80 % for the GEMV. The GEMV is checked against the CPU reference on every shape.
* prefill, T = 512 and 2048: ``fxport::int4_dequant`` + ``mm`` vs tinygemm vs bf16 ``mm``
  (microseconds and TFLOP/s).

Timing: ``triton.testing.do_bench`` (median, L2 flushed between runs). Command on a GPU machine:

    python bench/int4.py                 # add --sweep to also try GEMV tile configs

Without a GPU it runs a CPU sanity mode: it says so, checks the CPU reference ops against a
dense linear on a few 31B-like shapes scaled down and prints their (CPU) timings, which are no
GPU figures. ``--device cpu --preset tiny`` dry-runs the GPU code path on the CPU (tinygemm is
CUDA-only and shows as nan there).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def linear_shapes(preset: str = "31b") -> dict[tuple[int, int], int]:
    """{(N, K): count} of the nn.Linear layers of a preset (built on the meta device)."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(get_preset(preset), max_seq_len=16, max_batch_size=1)
    shapes = collections.Counter()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[(mod.out_features, mod.in_features)] += 1
    return dict(shapes)


def random_int4(n: int, k: int, g: int, device, dtype=torch.bfloat16):
    """Random canonical int4 weight: packed (N, K/2) u8, scales/zeros (N, K/g)."""
    from fxport.quant.packed import pack_int4

    packed = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8)).to(device)
    scales = (torch.rand(n, k // g, device=device) * 0.02 + 0.001).to(dtype)
    zeros = torch.full((n, k // g), 8.0, device=device, dtype=dtype)
    return packed, scales, zeros


def to_tinygemm(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, inner_k_tiles: int = 8):
    """Canonical -> tinygemm operands. tinygemm: w = (q - 8) * s + zero, nibbles high = even k."""
    lo, hi = packed & 0x0F, packed >> 4
    swapped = (lo << 4) | hi  # (N, K/2) u8 with the even column in the high nibble
    w_tiles = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
    tg_zero = (8.0 - zeros.float()) * scales.float()
    sz = torch.stack([scales.float(), tg_zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)
    return w_tiles, sz


def gpu(args) -> None:
    import fxport.kernels.int4_ops  # noqa: F401
    from fxport.kernels.int4_ops import int4_gemv_reference
    from fxport.kernels.triton.int4_gemv import int4_gemv_launch

    dev = torch.device(args.device)
    if dev.type == "cuda":
        import triton.testing

        name = torch.cuda.get_device_name(dev)
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3  # us  # noqa: E731
    else:  # --device cpu: dry run of the GPU code path (CPU reference ops, wall-clock timer)
        name = f"{dev} (dry run, not GPU figures)"

        def bench(fn, reps=3):
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps * 1e6

    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), 3350.0)
    g = args.group
    shapes = linear_shapes(args.preset)
    print(f"{name}: peak HBM {peak:.0f} GB/s (assumed), group {g}, preset {args.preset}")

    print(f"\n## decode GEMV, M = 1 (bf16 x)\n{'N':>7} {'K':>6} {'x':>3} | {'fxport us':>9} {'%HBM':>5} {'max err':>8} | "
          f"{'tinygemm us':>11} {'%HBM':>5} {'max err':>8} | {'bf16 us':>8} {'%HBM':>5}")
    tot = collections.Counter()
    for (n, k), count in sorted(shapes.items()):
        if k % g:
            print(f"{n:>7} {k:>6} {count:>3} | skipped: K not a multiple of group {g}")
            continue
        packed, scales, zeros = random_int4(n, k, g, dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        int4_bytes = packed.numel() + 2 * scales.numel() * scales.element_size() + 2 * (k + n)
        dense = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ref = int4_gemv_reference(x.float().cpu(), packed.cpu(), scales.cpu(), zeros.cpu(), g)
        out = torch.ops.fxport.int4_gemv(x, packed, scales, zeros, g)
        err = float((out.float().cpu() - ref).abs().max())
        t_fx = bench(lambda: torch.ops.fxport.int4_gemv(x, packed, scales, zeros, g))
        if args.sweep and dev.type == "cuda":
            for bn, bk2, nw in ((16, 256, 4), (32, 256, 4), (64, 128, 4), (32, 128, 8), (64, 256, 8)):
                t = bench(lambda: int4_gemv_launch(x, packed, scales, zeros, g, block_n=bn, block_k2=bk2, num_warps=nw))
                print(f"    sweep BLOCK_N={bn} BLOCK_K2={bk2} warps={nw}: {t:.1f} us {int4_bytes / t / 1e3 / peak * 100:.0f} %")
        try:
            w_tiles, sz = to_tinygemm(packed, scales, zeros)
            tg_err = float((torch.ops.aten._weight_int4pack_mm(x, w_tiles, g, sz).float().cpu() - ref).abs().max())
            t_tg = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w_tiles, g, sz))
        except RuntimeError as e:  # tinygemm unavailable on this build/arch
            print(f"    tinygemm failed: {str(e).splitlines()[0][:120]}")
            t_tg, tg_err = float("nan"), float("nan")
        t_bf = bench(lambda: x @ dense.t())
        pct = lambda b, t: b / t / 1e3 / peak * 100  # noqa: E731  bytes / us -> GB/s
        print(f"{n:>7} {k:>6} {count:>3} | {t_fx:>9.1f} {pct(int4_bytes, t_fx):>5.0f} {err:>8.1e} | "
              f"{t_tg:>11.1f} {pct(int4_bytes, t_tg):>5.0f} {tg_err:>8.1e} | {t_bf:>8.1f} {pct(2 * n * k, t_bf):>5.0f}")
        tot["fx"] += t_fx * count
        tot["tg"] += t_tg * count
        tot["bf"] += t_bf * count
        del dense
    print(f"sum over the model's linears (per decode token): fxport {tot['fx'] / 1e3:.2f} ms, "
          f"tinygemm {tot['tg'] / 1e3:.2f} ms, bf16 {tot['bf'] / 1e3:.2f} ms")

    print(f"\n## prefill linear (bf16 x)\n{'T':>5} {'N':>7} {'K':>6} | {'dequant+mm us':>13} {'TFLOP/s':>7} | "
          f"{'tinygemm us':>11} {'TFLOP/s':>7} | {'bf16 mm us':>10} {'TFLOP/s':>7}")
    for t_len in (512, 2048):
        for (n, k) in [s for s in sorted(shapes) if s[1] % g == 0][:: max(1, len(shapes) // 4)]:
            packed, scales, zeros = random_int4(n, k, g, dev)
            x = torch.randn(t_len, k, device=dev, dtype=torch.bfloat16)
            dense = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            flops = 2 * t_len * n * k
            t_dq = bench(lambda: x @ torch.ops.fxport.int4_dequant(packed, scales, zeros, g, torch.bfloat16).t())
            try:
                w_tiles, sz = to_tinygemm(packed, scales, zeros)
                t_tg = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w_tiles, g, sz))
            except RuntimeError:
                t_tg = float("nan")
            t_bf = bench(lambda: x @ dense.t())
            tf = lambda t: flops / t / 1e6  # noqa: E731
            print(f"{t_len:>5} {n:>7} {k:>6} | {t_dq:>13.1f} {tf(t_dq):>7.1f} | {t_tg:>11.1f} {tf(t_tg):>7.1f} | "
                  f"{t_bf:>10.1f} {tf(t_bf):>7.1f}")
            del dense


def cpu_sanity(args) -> None:
    import fxport.kernels.int4_ops  # noqa: F401
    from fxport.quant.packed import dequantize_codes, unpack_int4

    print("no GPU found: CPU sanity mode (reference ops only; these are not GPU figures).")
    print("GPU figures: run `python bench/int4.py` on a CUDA machine (torch + triton only).")
    shapes = linear_shapes(args.preset)
    print(f"{args.preset} linear shapes (N, K) x count: " + ", ".join(f"{n}x{k} x{c}" for (n, k), c in sorted(shapes.items())))
    g = args.group
    print(f"\n{'N':>6} {'K':>6} {'M':>4} | {'int4_gemv ms':>12} {'dequant+mm ms':>13} {'fp32 mm ms':>10} | {'max err':>8}")
    for (n, k) in sorted(shapes)[:3]:
        n, k = n // 8, k // 8  # scaled down for the CPU
        packed, scales, zeros = random_int4(n, k, g, "cpu", torch.float32)
        w = dequantize_codes(unpack_int4(packed), scales, zeros, g, torch.float32)
        for m in (1, 64):
            x = torch.randn(m, k)
            t0 = time.perf_counter()
            out = torch.ops.fxport.int4_gemv(x, packed, scales, zeros, g)
            t1 = time.perf_counter()
            out2 = x @ torch.ops.fxport.int4_dequant(packed, scales, zeros, g, torch.float32).t()
            t2 = time.perf_counter()
            ref = x @ w.t()
            t3 = time.perf_counter()
            err = max(float((out - ref).abs().max()), float((out2 - ref).abs().max()))
            print(f"{n:>6} {k:>6} {m:>4} | {(t1 - t0) * 1e3:>12.2f} {(t2 - t1) * 1e3:>13.2f} {(t3 - t2) * 1e3:>10.2f} | {err:>8.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="31b")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--peak-gbs", type=float, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time a few GEMV tile configs")
    ap.add_argument("--device", default="cuda", help="'cpu' dry-runs the GPU code path (use a tiny --preset)")
    args = ap.parse_args()
    if torch.cuda.is_available() or args.device != "cuda":
        gpu(args)
    else:
        cpu_sanity(args)


if __name__ == "__main__":
    main()
