"""Attention benchmark: fxport's split-K decode and tiled SDPA vs aten SDPA (and ExecuTorch's).

GPU (the figures), shapes read from the preset (``--preset``, default ``31b``), bf16:

* decode, one query, global layer (31B: H_q 32, H_kv 4, D 512) at L_kv = 4K, 16K, 64K, 128K:
  ``fxport::sdpa_decode_splitk`` (bool mask + valid length, as SDPADispatch emits it),
  ``fxport::sdpa`` (the tiled kernel), aten SDPA with each backend that accepts the call
  (flash: no mask, ``enable_gqa``; efficient / math: the bool mask over repeat_kv-expanded
  K/V, as the exported graph calls it) and ExecuTorch's ``triton::sdpa_decode_splitk`` when
  ``executorch.backends.cuda.triton.kernels`` imports. Per row: ms per layer and % of HBM
  bandwidth = bytes (K + V of the valid length, q, out, mask) / time / peak. Goal: split-K
  >= 85 % at 128K. Each fxport result is checked against aten math (max |diff|).
* crossover: decode split-K vs tiled at L_kv = 256 .. 16K, for the global and the sliding
  shapes: the smallest L_kv from which split-K stays faster -- the measured value for
  SDPADispatch's ``threshold`` (default 2048).
* prefill, causal, T = 512, 1024, 2048, 4096 (K/V length T): ``fxport::sdpa`` vs aten flash
  (``enable_gqa``, ``is_causal``; n/a where flash rejects the head dim) and efficient; ms and
  TFLOP/s (causal FLOPs = 2 * 2 * B * H_q * T^2 * D / 2).

Timing: ``triton.testing.do_bench`` (median). Peak bandwidth: from the device's memory clock
and bus width when torch reports them, else by name (H100 3350, H200 4800, A100 2039 GB/s), or
``--peak-gbs``. Command on a GPU machine (torch + triton only)::

    pip install --no-deps -e . && python bench/sdpa.py [--tune] [--out table.md]

Without a GPU it says so and runs the CPU sanity mode: the CPU reference impls of both ops
against aten SDPA on the global and sliding shapes at short lengths (CPU timings, not GPU
figures), then compiles the Triton kernels' default configs for sm_90 offline (Triton's own
ptxas; nothing is launched) and prints registers, spill bytes and shared memory per kernel.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


# ----------------------------------------------------------------------------- shapes


def attention_shapes(preset: str) -> dict[str, dict]:
    """{"global": {H_q, H_kv, D, scale}, "sliding": {..., window}} from the model preset."""
    from fxport.models.gemma4.config import get_preset

    cfg = get_preset(preset)
    out = {}
    for name, kind in (("global", "full_attention"), ("sliding", "sliding_attention")):
        if kind in cfg.layer_types:
            out[name] = dict(H_q=cfg.num_attention_heads, H_kv=cfg.kv_heads_for(kind), D=cfg.head_dim_for(kind),
                             scale=cfg.attention_scale)
    out.setdefault("sliding", dict(out["global"]))["window"] = cfg.sliding_window
    return out


def decode_inputs(shape: dict, S: int, device, dtype, valid: int | None = None):
    """q (1, H_q, 1, D), k/v (1, H_kv, S, D), bool mask (1, 1, 1, S) True below ``valid``, valid_len (1,)."""
    valid = S if valid is None else valid
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, shape["H_q"], 1, shape["D"], device=device, dtype=dtype, generator=g)
    k = torch.randn(1, shape["H_kv"], S, shape["D"], device=device, dtype=dtype, generator=g)
    v = torch.randn(1, shape["H_kv"], S, shape["D"], device=device, dtype=dtype, generator=g)
    mask = (torch.arange(S, device=device) < valid).view(1, 1, 1, S)
    return q, k, v, mask, torch.tensor([valid], device=device, dtype=torch.int32)


def decode_bytes(shape: dict, valid: int, itemsize: int) -> int:
    kv = 2 * shape["H_kv"] * valid * shape["D"] * itemsize
    qo = 2 * shape["H_q"] * shape["D"] * itemsize
    return kv + qo + valid  # + the bool mask row


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:  # repeat_kv, as the exported graph
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


# ----------------------------------------------------------------------------- GPU


def peak_gbs(device, override: float | None) -> float:
    if override:
        return override
    props = torch.cuda.get_device_properties(device)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:  # kHz, bits; DDR: 2 transfers per clock
        return 2 * clock * 1e3 * width / 8 / 1e9
    for key, gbs in PEAK_GBS.items():
        if key in props.name:
            return gbs
    raise SystemExit(f"unknown GPU {props.name!r}: pass --peak-gbs")


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def aten_variants(q, k, v, mask, scale):
    """name -> zero-arg callable of aten SDPA per backend (skipped when the backend refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_rep = q.shape[1] // k.shape[1]
    ke, ve = expand_kv(k, n_rep).contiguous(), expand_kv(v, n_rep).contiguous()
    calls = {
        "aten flash (no mask, gqa)": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=True)),
        "aten efficient (mask)": (SDPBackend.EFFICIENT_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, ke, ve, attn_mask=mask, scale=scale)),
        "aten math (mask)": (SDPBackend.MATH, lambda: F.scaled_dot_product_attention(
            q, ke, ve, attn_mask=mask, scale=scale)),
    }
    out = {}
    for name, (backend, fn) in calls.items():
        def run(fn=fn, backend=backend):
            with sdpa_kernel([backend]):
                return fn()
        try:
            run()
            out[name] = run
        except Exception:  # the backend refuses this call (head dim, mask, GQA): n/a
            out[name] = None
    return out


def executorch_splitk():
    try:
        import executorch.backends.cuda.triton.kernels  # noqa: F401  (registers torch.ops.triton.*)

        return torch.ops.triton.sdpa_decode_splitk
    except Exception:  # not installed, or does not import against this torch
        return None


def gpu_decode(shapes, lengths, dtype, peak, tune: bool, emit) -> None:
    import fxport.kernels.ops  # noqa: F401

    shape = shapes["global"]
    et = executorch_splitk()
    emit(f"\n## decode, global layer H_q={shape['H_q']} H_kv={shape['H_kv']} D={shape['D']}, {dtype}, "
         f"peak {peak:.0f} GB/s\n")
    emit("| L_kv | kernel | ms/layer | % HBM | max abs diff vs math |")
    emit("|---:|---|---:|---:|---:|")
    for S in lengths:
        q, k, v, mask, vl = decode_inputs(shape, S, "cuda", dtype)
        nbytes = decode_bytes(shape, S, q.element_size())
        ref = F.scaled_dot_product_attention(q.float(), expand_kv(k.float(), q.shape[1] // k.shape[1]),
                                             expand_kv(v.float(), q.shape[1] // k.shape[1]), attn_mask=mask,
                                             scale=shape["scale"])
        rows = {
            "fxport split-K": lambda: torch.ops.fxport.sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"]),
            "fxport tiled": lambda: torch.ops.fxport.sdpa(q, k, v, mask, vl, shape["scale"], False, 0),
            **aten_variants(q, k, v, mask, shape["scale"]),
        }
        if et is not None:
            rows["executorch split-K"] = lambda: et(q, k, v, mask, 0.0, False, shape["scale"], True)
        for name, fn in rows.items():
            if fn is None:
                emit(f"| {S} | {name} | n/a | | |")
                continue
            try:
                ms = bench_ms(fn)
                diff = (fn().float() - ref).abs().max().item()
            except Exception as exc:  # a kernel that does not support the shape: say so, go on
                emit(f"| {S} | {name} | failed: {type(exc).__name__}: {str(exc)[:60]} | | |")
                continue
            emit(f"| {S} | {name} | {ms:.4f} | {100 * nbytes / (ms * 1e-3) / 1e9 / peak:.1f} | {diff:.2e} |")
        del q, k, v, mask, ref
    if tune:
        tune_splitk(shape, lengths[-1], dtype, peak, emit)


def tune_splitk(shape, S, dtype, peak, emit) -> None:
    """Try split-K launch configs at the longest length; prints the best (for the default)."""
    from fxport.kernels.triton.sdpa_decode_splitk import DecodeConfig, default_decode_config, launch_sdpa_decode_splitk

    q, k, v, mask, vl = decode_inputs(shape, S, "cuda", dtype)
    nbytes = decode_bytes(shape, S, q.element_size())
    base = default_decode_config(shape["D"], S, shape["H_kv"], q.device).num_splits
    emit(f"\n## split-K configs at L_kv={S} (default {default_decode_config(shape['D'], S, shape['H_kv'], q.device)})\n")
    emit("| block_n | warps | stages | splits | ms | % HBM |")
    emit("|---:|---:|---:|---:|---:|---:|")
    for block_n in (16, 32, 64):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                for splits in (base // 2, base, 2 * base):
                    cfg = DecodeConfig(block_n, max(1, splits), warps, stages)
                    try:
                        ms = bench_ms(lambda: launch_sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"], cfg))
                    except Exception as exc:  # e.g. out of shared memory
                        emit(f"| {block_n} | {warps} | {stages} | {splits} | failed: {type(exc).__name__} | |")
                        continue
                    emit(f"| {block_n} | {warps} | {stages} | {splits} | {ms:.4f} | "
                         f"{100 * nbytes / (ms * 1e-3) / 1e9 / peak:.1f} |")


def gpu_crossover(shapes, dtype, emit) -> None:
    import fxport.kernels.ops  # noqa: F401

    lengths = [256, 512, 1024, 2048, 4096, 8192, 16384]
    emit("\n## decode crossover: split-K vs tiled (ms/layer)\n")
    emit("| shape | " + " | ".join(str(s) for s in lengths) + " | split-K faster from |")
    emit("|---|" + "---:|" * (len(lengths) + 1))
    for name, shape in shapes.items():
        cells, faster = [], []
        for S in lengths:
            q, k, v, mask, vl = decode_inputs(shape, S, "cuda", dtype)
            ms_s = bench_ms(lambda: torch.ops.fxport.sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"]))
            ms_t = bench_ms(lambda: torch.ops.fxport.sdpa(q, k, v, mask, vl, shape["scale"], False, 0))
            cells.append(f"{ms_s:.4f} / {ms_t:.4f}")
            faster.append(ms_s < ms_t)
        # smallest L_kv from which split-K is faster at every longer length
        start = next((lengths[i] for i in range(len(lengths)) if all(faster[i:])), None)
        label = f"{name} H_q={shape['H_q']} H_kv={shape['H_kv']} D={shape['D']}"
        emit(f"| {label} | " + " | ".join(cells) + f" | {start if start is not None else '> ' + str(lengths[-1])} |")
    emit("\nSDPADispatch uses split-K when L_kv > threshold: set threshold just below the value above.")


def gpu_prefill(shapes, dtype, emit) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fxport.kernels.ops  # noqa: F401

    emit("\n## prefill, causal (K/V length = T), ms and TFLOP/s\n")
    emit("| shape | T | fxport tiled | aten flash (gqa) | aten efficient (gqa) | max abs diff vs flash/efficient |")
    emit("|---|---:|---:|---:|---:|---:|")
    for name, shape in shapes.items():
        for T in (512, 1024, 2048, 4096):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, shape["H_q"], T, shape["D"], device="cuda", dtype=dtype, generator=g)
            k = torch.randn(1, shape["H_kv"], T, shape["D"], device="cuda", dtype=dtype, generator=g)
            v = torch.randn(1, shape["H_kv"], T, shape["D"], device="cuda", dtype=dtype, generator=g)
            flops = 2 * 2 * shape["H_q"] * T * T * shape["D"] / 2
            ours = lambda: torch.ops.fxport.sdpa(q, k, v, None, None, shape["scale"], True, 0)  # noqa: E731
            cells, ref = [], None
            for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                if backend is None:
                    fn = ours
                else:
                    def fn(backend=backend):
                        with sdpa_kernel([backend]):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=shape["scale"],
                                                                  enable_gqa=True)
                try:
                    out = fn()
                except Exception:  # the backend refuses this call (e.g. flash with D > 256): n/a
                    cells.append("n/a")
                    continue
                if backend is not None and ref is None:
                    ref = out
                ms = bench_ms(fn)
                cells.append(f"{ms:.3f} ms, {flops / (ms * 1e-3) / 1e12:.0f}")
            diff = f"{(ours().float() - ref.float()).abs().max().item():.2e}" if ref is not None else "n/a"
            emit(f"| {name} D={shape['D']} | {T} | " + " | ".join(cells) + f" | {diff} |")


# ----------------------------------------------------------------------------- offline sm_90 compile


class _OfflineSm90Driver:
    """Stands in for Triton's CUDA driver: reports an sm_90 target so kernels compile (ptxas
    ships with Triton) without a GPU. Nothing is launched."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _resource_usage(kernel) -> str:
    """'REG:n STACK:n' (STACK > 0 = register spills) from cuobjdump, plus shared memory."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line).split()
    regs, stack = line[0].split(":")[1], line[1].split(":")[1]
    return f"{regs} | {stack} | {kernel.metadata.shared // 1024}"


def compile_check(shapes, lengths, emit) -> None:
    """Compile the default configs for sm_90 (bf16, bool mask + valid_len) and report
    registers, spills and shared memory per kernel: the no-GPU evidence that they fit."""
    import triton

    from fxport.kernels.triton.sdpa import default_sdpa_config, launch_sdpa
    from fxport.kernels.triton.sdpa_decode_splitk import default_decode_config, launch_sdpa_decode_splitk

    emit("\n## sm_90 compile check of the default configs (bf16, bool mask + valid_len; no launch)\n")
    emit("| kernel | shape | config | registers | spill bytes (stack) | smem KiB |")
    emit("|---|---|---|---:|---:|---:|")
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_OfflineSm90Driver())
    try:
        for name, shape in shapes.items():
            label = f"{name} H_q={shape['H_q']} H_kv={shape['H_kv']} D={shape['D']}"
            S_max = max(lengths)
            cfg = default_decode_config(shape["D"], S_max, shape["H_kv"], torch.device("cuda"))
            q, k, v, mask, vl = decode_inputs(shape, 256, "cpu", torch.bfloat16)
            parts = launch_sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"], cfg, warmup=True)
            for kname, kernel in zip(("split-K partial", "split-K reduce"), parts):
                emit(f"| {kname} | {label} | L_kv={S_max}: {cfg} | {_resource_usage(kernel)} |")
            q4 = torch.zeros(1, shape["H_q"], 4, shape["D"], dtype=torch.bfloat16)  # speculative verification
            parts = launch_sdpa_decode_splitk(q4, k, v, mask, vl, shape["scale"], cfg, warmup=True, causal=True)
            emit(f"| split-K partial, L_q=4 causal | {label} | as above | {_resource_usage(parts[0])} |")
            (kernel,) = launch_sdpa(q, k, v, mask, vl, shape["scale"], False, 0, warmup=True)
            emit(f"| tiled, L_q=1 | {label} | block_m=16, else as below | {_resource_usage(kernel)} |")
            qp = torch.zeros(1, shape["H_q"], 256, shape["D"], dtype=torch.bfloat16)
            pmask = torch.ones(1, 1, 256, 256, dtype=torch.bool)
            (kernel,) = launch_sdpa(qp, k, v, pmask, vl, shape["scale"], False, 0, warmup=True)
            emit(f"| tiled, L_q=256 | {label} | {default_sdpa_config(shape['D'])} | {_resource_usage(kernel)} |")
    finally:
        driver._active = previous


# ----------------------------------------------------------------------------- CPU sanity


def cpu_sanity(shapes, emit) -> None:
    """The CPU reference impls against aten SDPA on the real head shapes at short lengths."""
    import fxport.kernels.ops  # noqa: F401

    emit("no GPU found (torch.cuda.is_available() is False): CPU reference sanity mode; "
         "the timings below are CPU reference timings, not GPU figures.\n")
    emit("| op | shape | L_kv | valid | ms (CPU) | max abs diff vs aten |")
    emit("|---|---|---:|---:|---:|---:|")
    for name, shape in shapes.items():
        n_rep = shape["H_q"] // shape["H_kv"]
        for S, valid in ((256, 256), (1024, 700)):
            q, k, v, mask, vl = decode_inputs(shape, S, "cpu", torch.float32, valid)
            ref = F.scaled_dot_product_attention(q, expand_kv(k, n_rep), expand_kv(v, n_rep), attn_mask=mask,
                                                 scale=shape["scale"])
            for op, fn in (
                ("sdpa_decode_splitk", lambda: torch.ops.fxport.sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"])),
                ("sdpa", lambda: torch.ops.fxport.sdpa(q, k, v, mask, vl, shape["scale"], False, 0)),
            ):
                t = time.perf_counter()
                out = fn()
                ms = (time.perf_counter() - t) * 1e3
                diff = (out - ref).abs().max().item()
                if not diff < 1e-5:
                    raise SystemExit(f"CPU sanity FAILED: {op} {name} S={S}: max abs diff {diff:.2e}")
                emit(f"| {op} | {name} H_q={shape['H_q']} H_kv={shape['H_kv']} D={shape['D']} | {S} | {valid} | "
                     f"{ms:.2f} | {diff:.1e} |")
    emit("\nCPU sanity: OK (both ops equal aten SDPA within 1e-5). Run on a GPU for the figures.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="31b")
    parser.add_argument("--lengths", default="4096,16384,65536,131072", help="decode L_kv values")
    parser.add_argument("--peak-gbs", type=float, default=None, help="HBM peak (GB/s); default from the device")
    parser.add_argument("--tune", action="store_true", help="also sweep split-K launch configs")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--no-compile-check", action="store_true",
                        help="without a GPU: skip compiling the kernels for sm_90 (registers/spills)")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)

    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    shapes = attention_shapes(args.preset)
    emit(f"# bench/sdpa.py, preset {args.preset}: " + ", ".join(
        f"{k} H_q={s['H_q']} H_kv={s['H_kv']} D={s['D']}" for k, s in shapes.items()))
    lengths = [int(x) for x in args.lengths.split(",")]
    if not torch.cuda.is_available():
        cpu_sanity(shapes, emit)
        if not args.no_compile_check:
            compile_check(shapes, lengths, emit)
    else:
        dev = torch.device("cuda")
        emit(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
        peak = peak_gbs(dev, args.peak_gbs)
        gpu_decode(shapes, lengths, torch.bfloat16, peak, args.tune, emit)
        gpu_crossover(shapes, torch.bfloat16, emit)
        if not args.no_prefill:
            gpu_prefill(shapes, torch.bfloat16, emit)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
