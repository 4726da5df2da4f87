"""One-shot GPU check: the CUDA path of fxport proved in one run of at most 8 minutes.

Made for a GPU machine that is lent rarely and briefly, with torch 2.11, triton 3.6,
transformers, pytest and hypothesis but no executorch or torchao: it needs only
``pip install --no-deps -e .`` on top of that. Seven stages, each with its own time budget and
its own try/except (a failing stage becomes a row with its error, and the next stage runs):

1. kernels compiled (``TRITON_INTERPRET=0``): ``tests/kernels`` and ``tests/triton`` in a
   pytest subprocess with a timeout, against the CPU / fp64 references;
2. split-K decode SDPA vs aten (flash / efficient / math through ``sdpa_kernel``) at L_kv 4K,
   32K, 128K for the 31B and E4B global-layer shapes, bf16: ms/layer, % of HBM bandwidth; the
   crossover length vs the tiled kernel and the ``SDPADispatch`` threshold it implies;
3. tiled prefill SDPA vs aten flash / efficient, causal, T = 512 .. 4096;
4. int4 GEMV at M = 1 for every 31B linear shape vs dense bf16 and tinygemm
   (``aten._weight_int4pack_mm``): % of HBM; prefill dequant + mm at T = 512, 2048;
5. the 31B-shaped model with random int4 weights: decode exported, rewritten by
   :func:`fxport.lowering.cuda.cuda_passes`, compiled with ``torch.compile`` (plus a CUDA graph
   replay): tok/s at 512, 8K and 128K context, peak GPU memory. A prefix of layers (one and,
   if the budget allows, two periods of the sliding/global pattern) is timed and scaled to 60
   layers, labelled so;
6. the ExecuTorch CUDA ``.pte`` export, only if ``executorch`` imports;
7. the command line's full path: ``fxport export --preset tiny --backend cuda --quant int4`` in a
   subprocess, then a short greedy generation through ExecuTorch's stock runner
   (``TextLLMRunner``) when the export worked and this machine's executorch runtime has the CUDA
   backend, else through AOTInductor in Python (the same model, int4 and CUDA passes, its decode
   method compiled with ``aoti_compile_and_package``); the row says which one ran and why, and
   checks the logits against the eager model's.

Writes ``<out>/gpu-check.md`` (default ``build/``): one table, columns stage, figure, goal,
status (ok / failed / skipped), seconds, and prints it. Exit status 0 unless a ``--require``d
row is missing or not ok.

GPU (``make gpu-check``)::

    pip install --no-deps -e . && TRITON_INTERPRET=0 python bench/gpu_check.py --out build

CPU smoke (``make gpu-smoke``, part of ``make test``): ``--smoke`` runs every stage's code path
on the CPU with tiny shapes, the Triton kernels under ``TRITON_INTERPRET=1``, and imports of
torchao / executorch blocked for stages 1-5 and 7 (as on the GPU machine); its figures are marked
"CPU smoke, not a measurement".

This module imports neither torchao nor executorch; stage 6 imports executorch only when
``importlib.util.find_spec`` finds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.abc
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE_NOTE = "CPU smoke, not a measurement"
# Peak HBM bandwidth by device name, GB/s (first match wins; --peak-gbs overrides).
PEAK_GBS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
            ("A100", 2039.0), ("L40S", 864.0))
BLOCKED = ("torchao", "executorch")  # absent on the GPU machine


def ensure_fxport_importable() -> None:
    """Without an install (``pip install -e .`` skipped or failed offline), make ``import fxport``
    find this checkout: a temporary directory holding an ``fxport`` symlink to the repository
    root goes on sys.path and on PYTHONPATH (for stage 1's pytest subprocess)."""
    if importlib.util.find_spec("fxport") is not None:
        return
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fxport-path-"))
    (d / "fxport").symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(d))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH")) if p)


# ----------------------------------------------------------------------------- table


@dataclasses.dataclass
class Row:
    stage: str
    figure: str
    goal: str
    status: str  # ok | failed | skipped
    seconds: float


class StageTimeout(Exception):
    """Raised by SIGALRM when a stage overruns its hard time limit."""


class Check:
    """Run state: mode, device, peak bandwidth, the rows, and the current stage's deadline."""

    def __init__(self, smoke: bool, peak_gbs: float | None, out: Path):
        self.smoke, self.out, self.rows = smoke, out, []
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16  # bf16 tl.dot is inexact in the interpreter
        self.name = "CPU (smoke)" if smoke else torch.cuda.get_device_name(0)
        self.peak = peak_gbs or (100.0 if smoke else device_peak_gbs(self.name))
        self.deadline = math.inf
        self.stage = ""
        self.facts: dict = {}  # figures one stage hands to a later one (the measured threshold)

    def add(self, figure: str, goal: str, status: str, seconds: float, stage: str | None = None) -> None:
        if self.smoke and status != "skipped":
            figure = f"{figure} ({SMOKE_NOTE})"
        self.rows.append(Row(stage or self.stage, figure, goal, status, seconds))

    def left(self) -> float:
        """Seconds left in the stage's budget. The smoke runs every step whatever the load (its
        work is small and fixed); its budgets only size the hang guard of :func:`run_stage`."""
        return math.inf if self.smoke else self.deadline - time.perf_counter()

    def ms(self, fn: Callable) -> float:
        """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on the GPU, one timed call
        after a warm-up call in the smoke (a code-path check, not a figure)."""
        if self.smoke:  # every fn was already called once (its correctness check)
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def pct(self, nbytes: float, ms: float) -> float:
        """% of peak bandwidth for ``nbytes`` moved in ``ms``."""
        return 100.0 * nbytes / (ms * 1e-3) / 1e9 / self.peak

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def device_peak_gbs(name: str) -> float:
    for key, gbs in PEAK_GBS:
        if key in name:
            return gbs
    raise SystemExit(f"gpu_check: unknown GPU {name!r}: pass --peak-gbs <GB/s>")


def table(rows: list[Row]) -> str:
    lines = ["| stage | figure | goal | status | seconds |", "|---|---|---|---|---:|"]
    for r in rows:
        fig = r.figure.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.stage} | {fig} | {r.goal} | {r.status} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _err(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}"


# ----------------------------------------------------------------------------- import blocking


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import torchao`` / ``import executorch`` fail as on the GPU machine."""

    def __init__(self, names):
        self.names, self.active = tuple(names), False

    def find_spec(self, fullname, path=None, target=None):
        if self.active and fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by gpu_check --smoke)", name=fullname)
        return None


# ----------------------------------------------------------------------------- shared helpers


def attention_shape(preset: str, layer_type: str) -> dict:
    from fxport.models.gemma4.config import get_preset

    cfg = get_preset(preset)
    return dict(H_q=cfg.num_attention_heads, H_kv=cfg.kv_heads_for(layer_type), D=cfg.head_dim_for(layer_type),
                scale=cfg.attention_scale)


def smoke_shape(global_layer: bool = True) -> dict:
    # the 31B head ratio (H_q / H_kv = 8 global, 2 sliding), tiny head dims
    return dict(H_q=8, H_kv=1 if global_layer else 4, D=64 if global_layer else 32, scale=0.125)


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:  # repeat_kv, as the exported graph
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def aten_sdpa(backend_name: str, q, k, v, mask, scale, is_causal=False):
    """aten SDPA restricted to one backend: flash takes native GQA without a mask, efficient and
    math the repeat_kv-expanded K/V with the bool mask (as the exported graph calls them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[backend_name]
    n_rep = q.shape[1] // k.shape[1]
    with sdpa_kernel([backend]):
        if backend_name == "flash":
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, expand_kv(k, n_rep), expand_kv(v, n_rep), attn_mask=mask,
                                              scale=scale, is_causal=is_causal)


def try_ms(chk: Check, fn: Callable) -> float | None:
    """Milliseconds of fn, or None when the backend refuses the call (no kernel for this shape)."""
    try:
        fn()
    except RuntimeError:
        return None
    return chk.ms(fn)


# ----------------------------------------------------------------------------- stage 1


def stage_kernel_tests(chk: Check, budget: float) -> None:
    """tests/kernels + tests/triton in a pytest subprocess (compiled on the GPU; a quick subset
    under the interpreter in the smoke), counted from ``-v`` output so a timeout still reports."""
    goal = "all pass"
    env = dict(os.environ, TRITON_INTERPRET="1" if chk.smoke else "0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=line", "-p", "no:cacheprovider", "-W", "ignore::UserWarning"]
    if chk.smoke:
        cmd += ["tests/triton/test_sdpa_kernels.py", "tests/triton/test_int4_kernels.py",
                "-k", "choose_num_splits or many_splits or traceable_launch"]
        what = "quick subset of tests/triton under TRITON_INTERPRET=1"
    else:
        env["FXPORT_MAX_EXAMPLES"] = "10"  # hypothesis examples per test: each new shape is a compile
        cmd += ["tests/triton", "tests/kernels"]  # the kernels first, the AOTInductor compiles last
        what = "tests/triton + tests/kernels compiled on CUDA (hypothesis <= 10 examples/test)"
    t0 = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=budget * (4 if chk.smoke else 1))
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, timed_out = -1, True
    dt = time.perf_counter() - t0
    (chk.out / "kernel-tests.log").write_text(out)
    counts = {k: len(re.findall(rf"^\S+::\S+ {k}", out, re.M)) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    failed = re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", out, re.M)
    fig = (f"{what}: {counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
           f"{counts['SKIPPED']} skipped")
    if failed:
        fig += "; first failures: " + ", ".join(f.split("::", 1)[1] for f in failed[:3])
    if timed_out:
        fig += f"; stopped at the {budget:.0f} s budget"
    ok = rc == 0 and counts["PASSED"] > 0 and not failed and not timed_out
    if rc not in (0, -1) and not failed:
        fig += f"; pytest exit {rc}: " + " ".join(out.strip().splitlines()[-2:])[:200]
    chk.add(fig + f" (log: {chk.out.name}/kernel-tests.log)", goal, "ok" if ok else "failed", dt)


# ----------------------------------------------------------------------------- stage 2


def decode_inputs(chk: Check, shape: dict, S: int, seed: int = 0):
    g = torch.Generator(device=chk.device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device=chk.device, dtype=chk.dtype, generator=g)  # noqa: E731
    q = mk(1, shape["H_q"], 1, shape["D"])
    k, v = mk(1, shape["H_kv"], S, shape["D"]), mk(1, shape["H_kv"], S, shape["D"])
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=chk.device)
    return q, k, v, mask, torch.tensor([S], dtype=torch.int32, device=chk.device)


def decode_bytes(shape: dict, S: int, itemsize: int) -> int:
    return 2 * shape["H_kv"] * S * shape["D"] * itemsize + 2 * shape["H_q"] * shape["D"] * itemsize + S


def keys_from_values_cost(chk: Check, S: int) -> tuple[str, float]:
    """ms to derive one 31B global layer's keys from its V cache (L_kv = S), eager and compiled,
    checked against rope(k_norm(raw)) written the two-cache way."""
    from fxport.models.gemma4.model import Attention, apply_rope, rope_inv_freq

    cfg = smoke_model_config() if chk.smoke else prefix_config(6)
    layer = cfg.layer_types.index("full_attention")
    with torch.device("meta"):
        attn = Attention(cfg, layer, 1, S)
    attn = attn.to_empty(device=chk.device)
    with torch.no_grad():
        attn.k_norm.weight.copy_(torch.rand_like(attn.k_norm.weight) + 0.5)
        attn.derive_keys_from_values()
        attn.cache_inv_freq.copy_(rope_inv_freq(attn.head_dim, *cfg.rope_for("full_attention")).to(chk.device))
        attn = attn.to(chk.dtype)
        raw = torch.randn(1, attn.n_kv_heads, S, attn.head_dim, device=chk.device, dtype=chk.dtype)
        v = attn.v_norm(raw)
        pos = torch.arange(S, device=chk.device).float()[:, None] * attn.cache_inv_freq.float()[None, :]
        emb = torch.cat((pos, pos), dim=-1)
        want = apply_rope(attn.k_norm(raw), emb.cos().to(chk.dtype), emb.sin().to(chk.dtype))
        got = attn._keys_from_values(v)
        err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
        t_eager = chk.ms(lambda: attn._keys_from_values(v))
        compiled = torch.compile(attn._keys_from_values, backend="eager" if chk.smoke else "inductor")
        compiled(v)
        t_comp = chk.ms(lambda: compiled(v))
    nbytes = 2 * v.numel() * v.element_size()  # read V, write K (the cos/sin tables are extra)
    return (f"k_eq_v single cache, L_kv={S}, H_kv={attn.n_kv_heads} D={attn.head_dim}: deriving K from V costs "
            f"{t_eager:.3f} ms eager, {t_comp:.3f} ms compiled ({chk.pct(nbytes, t_comp):.0f}% HBM for V in + K out) "
            f"per layer and step, saving {v.numel() * v.element_size() / 2**20:.0f} MiB per layer; "
            f"max diff vs rope(k_norm(raw)) {err:.1e} of the largest key"), err


def stage_splitk(chk: Check, budget: float) -> None:
    from fxport.kernels.triton.sdpa import launch_sdpa
    from fxport.kernels.triton.sdpa_decode_splitk import choose_num_splits, device_sms, launch_sdpa_decode_splitk

    tol = 2e-3 if chk.smoke else 3e-2  # fp32 smoke; bf16 output rounding on the GPU
    if chk.smoke:
        cases = [("31b-like global", smoke_shape(), (96,))]
        sweep = {"global": smoke_shape(), "sliding": smoke_shape(False)}
        sweep_lengths = [16, 64]
    else:
        K = 1024
        cases = [("31b global", attention_shape("31b", "full_attention"), (4 * K, 32 * K, 128 * K)),
                 ("e4b global", attention_shape("e4b", "full_attention"), (4 * K, 32 * K, 128 * K))]
        sweep = {"31b global": attention_shape("31b", "full_attention"),
                 "31b sliding": attention_shape("31b", "sliding_attention")}
        sweep_lengths = [256, 512, 1024, 2048, 4096, 8192, 16384]
    sms = device_sms(chk.device)
    for label, shape, lengths in cases:
        for S in lengths:
            if chk.left() < 0:
                chk.add(f"{label} L_kv={S}: not run, stage budget spent", "", "skipped", 0.0)
                continue
            t0 = time.perf_counter()
            q, k, v, mask, vl = decode_inputs(chk, shape, S)
            sc = shape["scale"]
            ref = aten_sdpa("math", q.float(), k.float(), v.float(), mask, sc)
            splitk = lambda: launch_sdpa_decode_splitk(q, k, v, mask, vl, sc)  # noqa: E731
            err = (splitk().float() - ref).abs().max().item()
            nbytes = decode_bytes(shape, S, q.element_size())
            ms = {"split-K": chk.ms(splitk),
                  "tiled": chk.ms(lambda: launch_sdpa(q, k, v, mask, vl, sc, False, 0))}
            for b in ("flash", "efficient", "math"):
                ms[f"aten {b}"] = try_ms(chk, lambda b=b: aten_sdpa(b, q, k, v, mask, sc))
            cells = ", ".join(f"{n} {'n/a' if t is None else f'{t:.3f} ms ({chk.pct(nbytes, t):.0f}%)'}"
                              for n, t in ms.items())
            best_aten = min((t for n, t in ms.items() if n.startswith("aten") and t is not None), default=math.inf)
            fig = (f"{label} H_q={shape['H_q']} H_kv={shape['H_kv']} D={shape['D']} L_kv={S} "
                   f"({choose_num_splits(S, shape['H_kv'], sms)} splits): {cells}; "
                   f"split-K vs best aten x{best_aten / ms['split-K']:.1f}; max abs diff split-K vs math fp32 {err:.1e}")
            chk.add(fig, "split-K >= 85% HBM at 128K, faster than aten", "ok" if err <= tol else "failed",
                    time.perf_counter() - t0)
            del q, k, v, mask, ref
    # the price of the k_eq_v single cache (derive_keys_from_values): K derived from V per step
    if chk.left() > 0:
        t0 = time.perf_counter()
        S = cases[0][2][-1]
        fig, err = keys_from_values_cost(chk, S)
        tol = 1e-6 if chk.smoke else 2 ** -6  # bf16: K rounded twice (V, then V * scale)
        chk.add(fig, "derive K << split-K time (else keep two caches)", "ok" if err <= tol else "failed",
                time.perf_counter() - t0)
    # crossover vs the tiled kernel (what SDPADispatch uses below its threshold)
    for label, shape in sweep.items():
        if chk.left() < 0:
            chk.add(f"crossover {label}: not run, stage budget spent", "", "skipped", 0.0)
            continue
        t0 = time.perf_counter()
        faster, cells = [], []
        for S in sweep_lengths:
            q, k, v, mask, vl = decode_inputs(chk, shape, S)
            t_s = chk.ms(lambda: launch_sdpa_decode_splitk(q, k, v, mask, vl, shape["scale"]))
            t_t = chk.ms(lambda: launch_sdpa(q, k, v, mask, vl, shape["scale"], False, 0))
            faster.append(t_s < t_t)
            cells.append(f"{S}: {t_s:.3f}/{t_t:.3f}")
        # threshold: split-K is used when L_kv > threshold, so the last length where it lost
        first = next((i for i in range(len(sweep_lengths)) if all(faster[i:])), None)
        if first is None:
            implied = f"split-K never faster up to {sweep_lengths[-1]}: threshold >= {sweep_lengths[-1]}"
        elif first == 0:
            implied = f"split-K faster from {sweep_lengths[0]}: threshold < {sweep_lengths[0]}"
            if label.endswith("global"):
                chk.facts["threshold"] = sweep_lengths[0]  # the shortest length measured (upstream's 256)
        else:
            implied = f"split-K faster from {sweep_lengths[first]}: threshold = {sweep_lengths[first - 1]}"
            if label.endswith("global"):
                chk.facts["threshold"] = sweep_lengths[first - 1]
        chk.add(f"crossover {label} (ms split-K/tiled) " + ", ".join(cells) + f" -> {implied} (default 2048)",
                "a measured SDPADispatch threshold", "ok", time.perf_counter() - t0)


# ----------------------------------------------------------------------------- stage 3


def stage_prefill(chk: Check, budget: float) -> None:
    from fxport.kernels.triton.sdpa import launch_sdpa

    if chk.smoke:
        cases = [("global", smoke_shape()), ("sliding", smoke_shape(False))]
        lengths = (24,)
    else:
        cases = [("31b sliding", attention_shape("31b", "sliding_attention")),
                 ("31b global", attention_shape("31b", "full_attention"))]
        lengths = (512, 1024, 2048, 4096)
    tol = 2e-3 if chk.smoke else 3e-2
    for label, shape in cases:
        for T in lengths:
            if chk.left() < 0:
                chk.add(f"{label} T={T}: not run, stage budget spent", "", "skipped", 0.0)
                continue
            t0 = time.perf_counter()
            g = torch.Generator(device=chk.device).manual_seed(T)
            mk = lambda *s: torch.randn(*s, device=chk.device, dtype=chk.dtype, generator=g)  # noqa: E731
            q = mk(1, shape["H_q"], T, shape["D"])
            k, v = mk(1, shape["H_kv"], T, shape["D"]), mk(1, shape["H_kv"], T, shape["D"])
            sc = shape["scale"]
            ours = lambda: launch_sdpa(q, k, v, None, None, sc, True, 0)  # noqa: E731
            ref = aten_sdpa("math", q.float(), k.float(), v.float(), None, sc, is_causal=True)
            err = (ours().float() - ref).abs().max().item()
            flops = 2 * 2 * shape["H_q"] * T * T * shape["D"] / 2
            ms = {"fxport tiled": chk.ms(ours)}
            for b in ("flash", "efficient"):
                ms[f"aten {b}"] = try_ms(chk, lambda b=b: aten_sdpa(b, q, k, v, None, sc, is_causal=True))
            cells = ", ".join(f"{n} {'n/a' if t is None else f'{t:.3f} ms ({flops / (t * 1e-3) / 1e12:.0f} TFLOP/s)'}"
                              for n, t in ms.items())
            chk.add(f"{label} D={shape['D']} T={T} causal: {cells}; max abs diff vs math fp32 {err:.1e}",
                    "tiled within 1.5x of aten flash", "ok" if err <= tol else "failed", time.perf_counter() - t0)
            del q, k, v, ref


# ----------------------------------------------------------------------------- stage 4


def linear_shapes(preset: str) -> dict[tuple[int, int], int]:
    """{(N, K): count} of the nn.Linear layers of a preset (built on the meta device)."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(get_preset(preset), max_seq_len=16, max_batch_size=1)
    shapes: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.out_features, mod.in_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def random_int4(n: int, k: int, g: int, device, dtype, seed: int = 0):
    """Random canonical int4 weight on ``device``: packed (N, K/2) uint8 (random bytes = two
    random nibbles), scales (N, K/g) ~ 0.001..0.021, zeros 8 (symmetric)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=gen)
    scales = (torch.rand(n, k // g, device=device, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.full((n, k // g), 8.0, device=device, dtype=dtype)
    return packed, scales, zeros


def tinygemm_operands(packed, scales, zeros):
    """Canonical -> ``aten._weight_int4pack_mm`` operands (w = (q - 8) * s + zero; even k in
    the high nibble)."""
    lo, hi = packed & 0x0F, packed >> 4
    w = torch.ops.aten._convert_weight_to_int4pack(((lo << 4) | hi).contiguous(), 8)
    zero = (8.0 - zeros.float()) * scales.float()
    sz = torch.stack([scales.float(), zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)
    return w, sz


def stage_int4(chk: Check, budget: float) -> None:
    from fxport.kernels.int4_ops import int4_dequant_reference, int4_gemv_reference
    from fxport.kernels.triton.int4_dequant import int4_dequant_launch
    from fxport.kernels.triton.int4_gemv import int4_gemv_launch

    from fxport.models.gemma4.config import get_preset

    g = 32
    head_cfg = get_preset("tiny" if chk.smoke else "31b")
    head_shape = (head_cfg.vocab_size, head_cfg.hidden_size)
    if chk.smoke:  # two small shapes and the output head (whose time stage 5 uses)
        all_shapes = linear_shapes("tiny")
        shapes = dict(sorted(all_shapes.items())[:2])
        shapes[head_shape] = all_shapes[head_shape]
        prefill_T = (8,)
    else:
        shapes = linear_shapes("31b")
        prefill_T = (512, 2048)
    totals = {"fxport": 0.0, "tinygemm": 0.0, "bf16": 0.0}
    nbytes_total = 0
    for (n, k), count in sorted(shapes.items()):
        if chk.left() < 0:
            chk.add(f"GEMV {n}x{k}: not run, stage budget spent", "", "skipped", 0.0)
            totals["fxport"] = math.nan
            continue
        t0 = time.perf_counter()
        packed, scales, zeros = random_int4(n, k, g, chk.device, chk.dtype, seed=n + k)
        x = torch.randn(1, k, device=chk.device, dtype=chk.dtype)
        out = int4_gemv_launch(x, packed, scales, zeros, g)
        ref = int4_gemv_reference(x, packed, scales, zeros, g).float()  # torch ops, fp32 accumulation
        err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        nbytes = packed.numel() + 2 * scales.numel() * scales.element_size() + (k + n) * x.element_size()
        t = {"fxport": chk.ms(lambda: int4_gemv_launch(x, packed, scales, zeros, g))}
        if n == head_shape[0] and k == head_shape[1]:
            chk.facts["head_ms"] = t["fxport"]  # the lm_head GEMV: the fixed cost stage 5 scales around
        t["tinygemm"] = None
        if chk.device.type == "cuda":
            try:
                w_tg, sz = tinygemm_operands(packed, scales, zeros)
                t["tinygemm"] = chk.ms(lambda: torch.ops.aten._weight_int4pack_mm(x, w_tg, g, sz))
            except RuntimeError:  # no tinygemm kernel in this build / for this arch
                t["tinygemm"] = None
        dense = torch.randn(n, k, device=chk.device, dtype=chk.dtype)
        t["bf16"] = chk.ms(lambda: x @ dense.t())
        del dense
        for name in totals:
            totals[name] += (t[name] if t[name] is not None else math.nan) * count
        nbytes_total += nbytes * count
        dense_bytes = n * k * x.element_size()
        tg = "n/a" if t["tinygemm"] is None else \
            f"{t['tinygemm'] * 1e3:.1f} us ({chk.pct(nbytes, t['tinygemm']):.0f}%)"
        cells = (f"fxport {t['fxport'] * 1e3:.1f} us ({chk.pct(nbytes, t['fxport']):.0f}% HBM), tinygemm {tg}, "
                 f"dense {str(chk.dtype)[6:]} {t['bf16'] * 1e3:.1f} us ({chk.pct(dense_bytes, t['bf16']):.0f}%)")
        chk.add(f"GEMV M=1 N={n} K={k} x{count}: {cells}; rel err vs fp32 ref {err:.1e}",
                ">= 80% HBM, faster than tinygemm", "ok" if err <= 1e-2 else "failed", time.perf_counter() - t0)
        del packed, scales, zeros
    chk.add(f"GEMV sum over the model's linears per token: fxport {totals['fxport']:.3f} ms "
            f"({chk.pct(nbytes_total, totals['fxport']):.0f}% HBM), tinygemm {totals['tinygemm']:.3f} ms, "
            f"dense {str(chk.dtype)[6:]} {totals['bf16']:.3f} ms", "", "ok" if math.isfinite(totals["fxport"]) else "failed", 0.0)
    # prefill: dequant + mm on two shapes (the MLP's gate and down projections)
    big = sorted(shapes, key=lambda s: -s[0] * s[1])
    for T in prefill_T:
        for n, k in [s for s in big if s[0] * s[1] < 1e9][:2]:
            if chk.left() < 0:
                chk.add(f"prefill T={T} {n}x{k}: not run, stage budget spent", "", "skipped", 0.0)
                continue
            t0 = time.perf_counter()
            packed, scales, zeros = random_int4(n, k, g, chk.device, chk.dtype)
            x = torch.randn(T, k, device=chk.device, dtype=chk.dtype)
            dense = int4_dequant_reference(packed, scales, zeros, g, chk.dtype)  # (N, K), torch ops
            deq = lambda: x @ int4_dequant_launch(packed, scales, zeros, g, chk.dtype).t()  # noqa: E731
            err = ((deq().float() - (x @ dense.t()).float()).abs().max()).item()
            flops = 2 * T * n * k
            t_dq, t_bf = chk.ms(deq), chk.ms(lambda: x @ dense.t())
            chk.add(f"prefill T={T} N={n} K={k}: dequant+mm {t_dq:.3f} ms ({flops / (t_dq * 1e-3) / 1e12:.0f} "
                    f"TFLOP/s), dense {str(chk.dtype)[6:]} mm {t_bf:.3f} ms ({flops / (t_bf * 1e-3) / 1e12:.0f}); "
                    f"max abs diff {err:.1e}", "dequant+mm within 1.3x of dense", "ok" if err <= 1e-2 * k ** 0.5 else
                    "failed", time.perf_counter() - t0)
            del packed, scales, zeros, x, dense


# ----------------------------------------------------------------------------- stage 5


def smoke_model_config():
    """The 31B preset's structure (5 sliding : 1 global, k_eq_v global layers with 512/256-style
    head dims halved down, no PLE / KV sharing) at toy sizes."""
    from fxport.models.gemma4.config import get_preset

    cfg = get_preset("31b")
    return dataclasses.replace(
        cfg, vocab_size=256, vocab_size_per_layer_input=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=6, layer_types=list(cfg.layer_types[:6]), num_attention_heads=4, num_key_value_heads=2,
        num_global_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=8, image_token_id=255,
        max_position_embeddings=512)


def prefix_config(n_layers: int):
    from fxport.models.gemma4.config import get_preset

    cfg = get_preset("31b")
    return dataclasses.replace(cfg, num_hidden_layers=n_layers, layer_types=list(cfg.layer_types[:n_layers]))


def random_int4_model(cfg, max_seq_len: int, device, dtype, group: int = 32):
    """Gemma4ForCausalLM with every linear (lm_head untied) a QuantizedLinear of random int4
    weights, norms 1, embeddings N(0, 0.02), caches 0. Built on the meta device with the
    linears swapped before anything is allocated, so only int4 bytes are ever materialized."""
    from fxport.models.gemma4.model import Gemma4ForCausalLM, RotaryEmbedding
    from fxport.quant.linear import QuantizedLinear
    from fxport.quant.packed import QuantizedWeight

    cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg, max_seq_len=max_seq_len, max_batch_size=1)
        for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
            n, k = mod.out_features, mod.in_features
            qw = QuantizedWeight(torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, k // group),
                                 torch.empty(n, k // group), group, 4, (n, k))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, QuantizedLinear(qw))
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
        rope = RotaryEmbedding(cfg).to(device)  # non-persistent inv_freq buffers, recomputed
        for name, b in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight_packed":  # random bytes = two random 4-bit codes
                b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, device=device, generator=gen))
            elif leaf == "weight_scales":  # ~0.001..0.021 / sqrt(K / 1024): activations stay O(1)
                k = b.shape[1] * group
                b.copy_((torch.rand(b.shape, device=device, generator=gen) * 0.02 + 0.001) / max(1.0, (k / 1024) ** 0.5))
            elif leaf == "weight_zeros":
                b.fill_(8.0)
            elif leaf in ("k_cache", "v_cache"):
                b.zero_()
            elif leaf == "embed_scale":
                b.fill_(cfg.hidden_size ** 0.5)
            elif leaf == "layer_scalar":
                b.fill_(1.0)
            elif leaf.endswith("_inv_freq"):
                b.copy_(getattr(rope, leaf))
            else:
                raise ValueError(f"random_int4_model: no initializer for buffer {name}; add one")
    return model.to(dtype).eval()


def decode_program(model, device, splitk_threshold: int):
    """The decode method exported and rewritten by the CUDA pass set; returns (module, {kernel
    choice: number of sites})."""
    from fxport.lowering.cuda import cuda_passes
    from fxport.models.gemma4.model import sliding_window_buffers
    from fxport.passes.pipeline import apply

    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        ep = torch.export.export(model, (tokens, pos)).run_decompositions({})
    result = apply(ep, cuda_passes(windows=sliding_window_buffers(model), splitk_threshold=splitk_threshold)["decode"], method="decode", dump=False)
    choices: dict[str, int] = {}
    for rec in result.records:
        for site in rec.stats.sites:
            if "choice" in site:
                choices[site["choice"]] = choices.get(site["choice"], 0) + 1
    return result.ep.module(), choices


def time_decode(chk: Check, fn, contexts, steps: int) -> dict[int, float]:
    """{context: ms per decode step} at each context (the token at position context - 1)."""
    tok = torch.ones(1, 1, dtype=torch.long, device=chk.device)
    out = {}
    for c in contexts:
        pos = torch.tensor([c - 1], dtype=torch.long, device=chk.device)
        for _ in range(2):
            fn(tok, pos)
        chk.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(tok, pos)
        chk.sync()
        out[c] = (time.perf_counter() - t0) / steps * 1e3
    return out


def graph_replay(chk: Check, fn):
    """fn(tok, pos) captured in a CUDA graph; returns replay(tok, pos) (copies into the static
    inputs, replays), or raises when capture fails."""
    tok = torch.ones(1, 1, dtype=torch.long, device=chk.device)
    pos = torch.zeros(1, dtype=torch.long, device=chk.device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(tok, pos)

    def replay(t, p):
        tok.copy_(t)
        pos.copy_(p)
        graph.replay()
    return replay


def kv_and_weight_bytes(cfg, context: int, itemsize: int = 2, group: int = 32) -> int:
    """Bytes one decode step must read: int4 weights (+ scales/zeros), one embedding row, and
    the K/V of every layer at ``context`` (sliding layers at most the window)."""
    n_bytes = 0
    for i, t in enumerate(cfg.layer_types):
        hd, kvh = cfg.head_dim_for(t), cfg.kv_heads_for(t)
        H, inter, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * hd
        kv_proj = 1 if (cfg.attention_k_eq_v and t == "full_attention") else 2
        weights = H * q * 2 + H * kvh * hd * kv_proj + 3 * H * inter
        n_bytes += weights // 2 + weights // group * 2 * itemsize
        span = min(context, cfg.sliding_window) if t == "sliding_attention" else context
        n_bytes += 2 * kvh * hd * span * itemsize
    head = cfg.vocab_size * cfg.hidden_size
    return n_bytes + head // 2 + head // group * 2 * itemsize + cfg.hidden_size * itemsize


def stage_decode(chk: Check, budget: float) -> None:
    K = 1024
    if chk.smoke:
        plans = [(smoke_model_config(), 256)]
        contexts, steps, full_layers = (16, 64, 200), 2, 6
    else:
        plans = [(prefix_config(6), 128 * K + 64), (prefix_config(12), 128 * K + 64)]
        contexts, steps, full_layers = (512, 8 * K, 128 * K), 20, 60
    # split-K threshold: the one stage 2 measured for the global shape, else the default (the
    # smoke uses 32 so that its 256-slot global caches take the split-K path)
    threshold = 32 if chk.smoke else chk.facts.get("threshold", 2048)
    measured: list[tuple[int, dict, dict | None]] = []  # (layers, {ctx: ms compiled}, {ctx: ms graph})
    sources: list[str] = []  # what each measurement timed
    est_setup = None
    for cfg, max_seq in plans:
        n = cfg.num_hidden_layers
        if measured and (est_setup is None or chk.left() < 2.2 * est_setup):
            chk.add(f"{n}-layer prefix: not run, the stage budget would be exceeded "
                    f"(previous prefix took {est_setup:.0f} s)", "", "skipped", 0.0)
            break
        t0 = time.perf_counter()
        if chk.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = random_int4_model(cfg, max_seq, chk.device, chk.dtype)
        t_build = time.perf_counter() - t0
        module, choices = decode_program(model, chk.device, threshold)
        del model
        t_passes = time.perf_counter() - t0 - t_build
        tok = torch.ones(1, 1, dtype=torch.long, device=chk.device)
        p0 = torch.tensor([contexts[0] - 1], device=chk.device)
        with torch.no_grad():  # the rewritten program in eager first: a figure even if compile fails
            want = module(tok, p0).float()
            ms_eager = time_decode(chk, module, contexts, max(2, steps // 4))
        eager_cells = ", ".join(f"{c}: {ms_eager[c]:.2f} ms" for c in contexts)
        backend = "eager" if chk.smoke else "inductor"
        try:
            compiled = torch.compile(module, backend=backend, dynamic=False)
            t1 = time.perf_counter()
            with torch.no_grad():
                got = compiled(tok, p0).float()  # compiles here
            t_compile = time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001  the eager figure still goes in the table
            chk.add(f"{n}-layer prefix: torch.compile ({backend}) failed: {_err(exc)}; rewritten program in eager "
                    f"(ms/step) {eager_cells}; kernels {choices}", "compiled decode", "failed", time.perf_counter() - t0)
            measured.append((n, ms_eager, None))
            sources.append("the eager program (compile failed)")
            est_setup = time.perf_counter() - t0
            del module
            torch._dynamo.reset()
            gc.collect()
            continue
        diff = (got - want).abs().max().item()
        with torch.no_grad():
            ms = time_decode(chk, compiled, contexts, steps)
            ms_graph, graph_note = None, "CUDA graph: n/a on CPU"
            if chk.device.type == "cuda":
                try:
                    ms_graph = time_decode(chk, graph_replay(chk, compiled), contexts, steps)
                    graph_note = "CUDA graph replay"
                except Exception as exc:  # capture refused (a sync or allocation in the program)
                    graph_note = f"CUDA graph capture failed: {_err(exc)[:120]}"
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if chk.device.type == "cuda" else "n/a (CPU)"
        dt = time.perf_counter() - t0
        est_setup = dt
        measured.append((n, ms, ms_graph))
        sources.append("CUDA graph replay" if ms_graph else "the compiled program")
        best = ms_graph or ms
        cells = ", ".join(f"{c // K if c >= K else c}{'K' if c >= K else ''}: {1e3 / best[c]:.1f} tok/s "
                          f"({best[c]:.2f} ms)" for c in contexts)
        chk.add(f"{n}-layer prefix of 31b{' (toy sizes)' if chk.smoke else ''}, random int4 g32, "
                f"torch.compile {backend} + {graph_note}: {cells}; "
                f"compiled: " + ", ".join(f"{c}: {ms[c]:.2f} ms" for c in contexts) +
                f"; eager: {eager_cells}; kernels {choices} (split-K threshold {threshold}); "
                f"max abs diff compiled vs eager logits {diff:.1e}; peak GPU memory {peak}; "
                f"build {t_build:.0f} s, export+passes {t_passes:.0f} s, compile {t_compile:.0f} s",
                "decode tok/s (ceiling: bytes/token / HBM)",
                "ok" if math.isfinite(diff) and diff <= (1e-4 if chk.smoke else 1.0) else "failed",
                dt)
        del module, compiled
        torch._dynamo.reset()  # drop the compiled graph's references to this prefix's weights
        gc.collect()
    if not measured:
        return
    # scale to the full model: two prefixes give per-layer-period time + fixed cost (head, embedding)
    full_cfg = prefix_config(full_layers) if not chk.smoke else smoke_model_config()
    pick = lambda m: m[2] or m[1]  # noqa: E731
    if len(measured) >= 2:
        (n1, *_), (n2, *_) = measured[0], measured[1]
        a, b = pick(measured[0]), pick(measured[1])
        est = {c: a[c] + (b[c] - a[c]) * (full_layers - n1) / (n2 - n1) for c in contexts}
        how = f"linear fit over the {n1}- and {n2}-layer prefixes, scaled to {full_layers} layers"
    elif "head_ms" in chk.facts:  # per-layer part scaled, the lm_head GEMV (stage 4) counted once
        n1, head = measured[0][0], chk.facts["head_ms"]
        est = {c: head + (pick(measured[0])[c] - head) * full_layers / n1 for c in contexts}
        how = (f"{n1}-layer prefix minus the lm_head GEMV of stage 4 ({head:.3f} ms), x {full_layers / n1:g}, "
               f"plus the head once")
    else:
        n1 = measured[0][0]
        est = {c: pick(measured[0])[c] * full_layers / n1 for c in contexts}
        how = f"{n1}-layer prefix x {full_layers / n1:g} (head counted {full_layers / n1:g}x: a lower bound on tok/s)"
    cells = []
    for c in contexts:
        ceiling = chk.peak * 1e9 / kv_and_weight_bytes(full_cfg, c)
        cells.append(f"{c // K if c >= K else c}{'K' if c >= K else ''}: {1e3 / est[c]:.1f} tok/s "
                     f"(ceiling {ceiling:.0f})")
    chk.add(f"31b decode, {full_layers} layers, estimated ({how}; timing {', '.join(sorted(set(sources)))}): "
            + ", ".join(cells),
            "llama.cpp 68 tok/s (H100), ExecuTorch 45 (A100)", "ok", 0.0)


# ----------------------------------------------------------------------------- stage 6


def stage_executorch(chk: Check, budget: float) -> None:
    t0 = time.perf_counter()
    try:
        spec = importlib.util.find_spec("executorch")
    except ModuleNotFoundError:  # the smoke's import blocker (the GPU machine's situation)
        spec = None
    if spec is None:
        chk.add("skipped: executorch not installed", "", "skipped", 0.0)
        return
    try:
        import executorch  # noqa: F401
        from executorch.backends.cuda.cuda_partitioner import CudaPartitioner  # noqa: F401
    except Exception as exc:  # installed but built for another torch
        chk.add(f"skipped: executorch does not import ({_err(exc)[:150]})", "", "skipped", time.perf_counter() - t0)
        return
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    torch.manual_seed(0)
    model = Gemma4ForCausalLM(get_preset("tiny"), max_seq_len=64).eval()
    from fxport.builder import BuildOptions, Source, build

    if chk.device.type != "cuda":
        report = build(Source(model=model), None, BuildOptions(backend="cuda", max_seq_len=int(model.max_seq_len),
                                                               max_prefill_chunk=8, dry_run=True)).report
        ok = report.fully_delegated
        chk.add(f"tiny model, CUDA partition dry run (no GPU: no AOTInductor compile): "
                f"{'every node delegated' if ok else report.summary()[:200]}", "fully delegated",
                "ok" if ok else "failed", time.perf_counter() - t0)
        return
    result = build(Source(model=model.to("cuda")), chk.out / "tiny-cuda.pte",
                   BuildOptions(backend="cuda", max_seq_len=int(model.max_seq_len), max_prefill_chunk=8))
    chk.add(f"tiny model CUDA .pte + .ptd written: {result.summary()[:200]}", ".pte compiles", "ok",
            time.perf_counter() - t0)


# ----------------------------------------------------------------------------- stage 7

# What a user types (the CLI's defaults aside: a small cache and chunk keep the compile short).
CLI_EXPORT = ["export", "--preset", "tiny", "--backend", "cuda", "--quant", "int4", "--max-seq-len", "64",
              "--max-prefill-chunk", "8", "--quiet"]
CLI_NO_GPU = ("fxport export: error: --backend cuda compiles with AOTInductor on a CUDA GPU and none is visible; "
              "add --dry-run for the partition report on this machine")
GEN_PROMPT = [2, 17, 101, 9, 33]  # token ids of the tiny vocabulary (BOS first)
GEN_NEW = 8


def executorch_runs_cuda() -> tuple[bool, str]:
    """(True, why) when this machine's executorch runtime can run a CUDA program: its pybindings
    import and register ``CudaBackend`` (a CUDA build of the wheel) and a GPU is visible."""
    try:
        spec = importlib.util.find_spec("executorch")
    except ModuleNotFoundError:  # the smoke's import blocker (the GPU machine's situation)
        return False, "executorch blocked in the smoke, as absent on the GPU machine"
    if spec is None:
        return False, "executorch not installed"
    try:
        from executorch.extension.pybindings import portable_lib

        names = list(portable_lib._get_registered_backend_names())
    except Exception as exc:  # noqa: BLE001  installed but built for another torch
        return False, f"executorch's runtime does not import ({_err(exc)[:120]})"
    if "CudaBackend" not in names:
        return False, f"executorch's runtime has no CudaBackend (registered: {', '.join(names) or 'none'})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "executorch's runtime registers CudaBackend"


def _plain_int4(model, group: int = 32) -> int:
    """Every linear whose K divides by ``group`` -> fxport's QuantizedLinear with symmetric int4
    codes (scale = max|w| / 7.5 per group, zero 8: torchao's symmetric int4 rule) computed in plain
    torch, for a machine without torchao; returns the number of linears."""
    from fxport.quant.linear import to_quantized_linears
    from fxport.quant.packed import QuantizedWeight, pack_int4

    weights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % group == 0:
            w = mod.weight.detach().float()
            n, k = w.shape
            wg = w.reshape(n, k // group, group)
            scale = (wg.abs().amax(-1, keepdim=True) / 7.5).clamp_min(1e-8)
            codes = (torch.round(wg / scale).clamp(-8, 7) + 8).reshape(n, k).to(torch.uint8)
            weights[f"{name}.weight"] = QuantizedWeight(pack_int4(codes), scale.reshape(n, k // group),
                                                        torch.full((n, k // group), 8.0), group, 4, (n, k))
    return len(to_quantized_linears(model, weights))


def cli_model(chk: Check):
    """The model ``fxport export --preset tiny`` builds (seed 0), int4 as ``--quant int4`` makes
    it when torchao imports (else :func:`_plain_int4`), on the check's device; (model, how)."""
    from fxport.builder import Source, load_source

    model, _ = load_source(Source(preset="tiny", seed=0), max_seq_len=int(CLI_EXPORT[CLI_EXPORT.index("--max-seq-len") + 1]))
    try:
        from fxport.lowering.cuda import quantize_for_cuda

        n = len(quantize_for_cuda(model, "int4"))
        how = f"torchao int4 g32 on {n} linears (as --quant int4)"
    except ImportError:  # no torchao here (the GPU machine): the same int4 rule in plain torch
        n = _plain_int4(model)
        how = f"int4 g32 on {n} linears in plain torch (torchao not installed)"
    return model.to(chk.device).eval(), how


def _teacher_forced(step, prompt: list[int], tokens: list[int], device) -> torch.Tensor:
    """Logits (n, V) of ``step(token (1, 1), pos (1,))`` over prompt + tokens, one token per call,
    for the positions that predict each new token."""
    seq = prompt + tokens
    out = []
    with torch.no_grad():
        for i, t in enumerate(seq[:-1]):
            logits = step(torch.tensor([[t]], device=device), torch.tensor([i], device=device))
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            if i >= len(prompt) - 1:
                out.append(logits.reshape(-1).float().cpu())
    return torch.stack(out)


def generate_aoti(chk: Check, why_not_runner: str) -> None:
    """The fallback: the CLI's model through the CUDA passes, its decode method compiled by
    AOTInductor and run from Python (one token per call: the prompt, then greedy tokens); logits
    vs the eager model under the same tokens. The smoke runs the rewritten program eagerly."""
    import copy

    from fxport.builder import BuildOptions, export_programs, sliding_windows
    from fxport.lowering import cuda as cuda_backend

    t0 = time.perf_counter()
    model, quant_how = cli_model(chk)
    eager = copy.deepcopy(model)  # its own KV cache: the program's run leaves it untouched
    options = BuildOptions(backend="cuda", quant="int4", max_seq_len=int(model.max_seq_len), max_prefill_chunk=8)
    programs = export_programs(model, options, ("decode",))
    programs, results = cuda_backend.run_passes(programs, options, windows=sliding_windows(model))
    kernels = sorted({s["choice"] for r in results["decode"].records for s in r.stats.sites if "choice" in s})
    if chk.device.type == "cuda":
        if chk.left() < 20:
            chk.add(f"AOTInductor generation skipped: {chk.left():.0f} s of the budget left after export + passes "
                    f"({time.perf_counter() - t0:.0f} s)", "", "skipped", time.perf_counter() - t0)
            return
        t1 = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(programs["decode"],
                                                           package_path=str(chk.out / "cli-tiny-decode.pt2"))
        step = torch._inductor.aoti_load_package(package)
        how = f"AOTInductor in Python (decode compiled in {time.perf_counter() - t1:.0f} s)"
    else:
        step = programs["decode"].module()
        how = "the rewritten decode program run eagerly (no AOTInductor compile on CPU)"
    # Eager greedy tokens, then both under those tokens (teacher forcing: the same positions).
    with torch.no_grad():
        ids = []
        for i in range(len(GEN_PROMPT) + GEN_NEW - 1):
            t = GEN_PROMPT[i] if i < len(GEN_PROMPT) else ids[i - len(GEN_PROMPT)]
            logits = eager(torch.tensor([[t]], device=chk.device), torch.tensor([i], device=chk.device))
            if i >= len(GEN_PROMPT) - 1:
                ids.append(int(logits.reshape(-1).argmax()))
    chk.sync()
    t2 = time.perf_counter()
    got = _teacher_forced(step, GEN_PROMPT, ids, chk.device)
    chk.sync()
    per_step = (time.perf_counter() - t2) / (len(GEN_PROMPT) + GEN_NEW - 1) * 1e3
    want = _teacher_forced(eager, GEN_PROMPT, ids, chk.device)  # a second pass: rewrites the same cache slots
    diff = (got - want).abs().max().item()
    same = got.argmax(-1).tolist() == ids
    tol = 1e-3 if chk.smoke else 5e-2  # fp32 CPU reference kernels; compiled Triton kernels (tf32 / order)
    chk.add(f"generation through {how} [stock runner not used: {why_not_runner}]: tiny model, {quant_how}; "
            f"decode kernels {kernels}; prompt {len(GEN_PROMPT)} ids + {GEN_NEW} greedy tokens, one token per call "
            f"({per_step:.1f} ms/call, tiny model: not a speed figure); greedy tokens equal the eager model's: "
            f"{'yes' if same else 'no'}; max abs logit diff vs eager {diff:.1e}",
            f"logits within {tol:g} of eager", "ok" if math.isfinite(diff) and diff <= tol else "failed",
            time.perf_counter() - t0)


def generate_stock_runner(chk: Check, pte: Path, ptd: Path | None) -> None:
    """ExecuTorch's ``TextLLMRunner`` on the CLI's program, with a small tokenizer for the tiny
    vocabulary (``tests/runtime/stock_runner_helpers.py``); its text vs the eager model's."""
    from fxport.runtime.stock_runner import StockRunner

    t0 = time.perf_counter()
    helpers = importlib.util.spec_from_file_location("stock_runner_helpers", ROOT / "tests/runtime/stock_runner_helpers.py")
    module = sys.modules[helpers.name] = importlib.util.module_from_spec(helpers)
    helpers.loader.exec_module(module)
    tok = module.tiny_tokenizer(256)
    tok_path = chk.out / "cli-tiny-tokenizer.json"
    tok.save(tok_path)
    prompt = "hello world"
    runner = StockRunner(pte, tok_path, ptd)
    gen = runner.generate(prompt, GEN_NEW)
    # the eager model's greedy text from the same ids (BOS + the prompt)
    model, quant_how = cli_model(chk)
    ids = tok.encode(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=chk.device), torch.arange(len(ids), device=chk.device))
        new = [int(logits[0, -1].argmax())]
        for i in range(GEN_NEW - 1):
            logits = model(torch.tensor([[new[-1]]], device=chk.device), torch.tensor([len(ids) + i], device=chk.device))
            new.append(int(logits.reshape(-1).argmax()))
    want = tok.decode(new)
    same = gen.text == want
    chk.add(f"generation through ExecuTorch's stock runner (TextLLMRunner, CudaBackend): {gen.prompt_tokens} prompt "
            f"tokens, {gen.generated_tokens} generated, {gen.prefill_tok_s:.1f} tok/s prefill, "
            f"{gen.decode_tok_s:.1f} tok/s decode (tiny model: not a speed figure), load {gen.load_s:.2f} s; "
            f"text {gen.text!r} vs eager ({quant_how}) {want!r}: {'equal' if same else 'different'}",
            "runner generates the eager model's text", "ok" if same else "failed", time.perf_counter() - t0)


def stage_cli(chk: Check, budget: float) -> None:
    """``fxport export ... --backend cuda --quant int4`` as typed, then a short generation (the
    stock runner when this machine can run the program, else AOTInductor in Python)."""
    t0 = time.perf_counter()
    pte = chk.out / "cli-tiny-int4.pte"
    argv = [*CLI_EXPORT, "--out", str(pte)]
    shown = "fxport " + " ".join([*CLI_EXPORT, "--out", pte.name])
    try:
        proc = subprocess.run([sys.executable, "-m", "fxport.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=max(10.0, budget * (4 if chk.smoke else 0.5)))
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = None, str(exc.stdout or ""), f"timed out after {exc.timeout:.0f} s"
    (chk.out / "cli-export.log").write_text(stdout + stderr)
    last = (stderr.strip().splitlines() or [""])[-1]
    exported = rc == 0 and pte.is_file()
    if exported:
        figure, status = f"`{shown}`: exit 0, wrote {pte.name} + its .ptd", "ok"
    elif chk.device.type != "cuda":  # the documented refusal of a machine without a GPU
        figure, status = f"`{shown}`: exit {rc}, {last!r}", "ok" if (rc, last) == (2, CLI_NO_GPU) else "failed"
    else:
        missing = re.search(r"No module named '(\w+)", last)
        figure = f"`{shown}`: exit {rc}, {last[:240]!r} (log: {chk.out.name}/cli-export.log)"
        status = "skipped" if missing and missing.group(1) in BLOCKED else "failed"
    chk.add(figure, "exit 0 and a .pte on a GPU; the no-GPU refusal on CPU", status, time.perf_counter() - t0)
    runs, why = executorch_runs_cuda()
    if exported and runs:
        ptd = next((Path(m) for m in re.findall(r"^wrote (\S+\.ptd) ", stdout, re.M)), None)
        generate_stock_runner(chk, pte, ptd)
        return
    generate_aoti(chk, why if exported else f"no program from the command ({why})")


# ----------------------------------------------------------------------------- driver

# (number, name, GPU budget s, smoke budget s, function); GPU budgets sum to 505 s (8.4 min,
# under make gpu-check's 540 s timeout). Smoke budgets size only the hang guard (4x + 30 s); a
# quiet 2-core machine needs about a third.
STAGES = [
    (1, "kernel tests (compiled)", 125, 40, stage_kernel_tests),
    (2, "split-K decode SDPA", 65, 20, stage_splitk),
    (3, "tiled prefill SDPA", 35, 10, stage_prefill),
    (4, "int4 GEMV", 55, 10, stage_int4),
    (5, "decode, 31b int4", 125, 60, stage_decode),
    (6, "ExecuTorch CUDA .pte", 10, 60, stage_executorch),
    (7, "fxport export + generation", 90, 30, stage_cli),
]


def run_stage(chk: Check, number: int, name: str, budget: float, fn) -> None:
    """fn within ``budget`` seconds (stages check ``chk.left()`` between measurements; SIGALRM
    stops one that overruns by more than 25 % + 10 s, in the smoke 4x + 30 s: a hang guard).
    Any exception becomes a failed row."""
    chk.stage = f"{number}. {name}"
    t0 = time.perf_counter()
    chk.deadline = t0 + budget
    n_rows = len(chk.rows)

    hard = budget * 4 + 30 if chk.smoke else budget * 1.25 + 10

    def on_alarm(signum, frame):
        raise StageTimeout(f"hard limit {hard:.0f} s reached")

    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, hard)
    try:
        fn(chk, budget)
    except BaseException as exc:  # noqa: BLE001  a failing stage is a row; the next stage runs
        if isinstance(exc, KeyboardInterrupt):
            raise
        (chk.out / f"stage{number}-error.txt").write_text(traceback.format_exc())
        chk.add(f"{_err(exc)} (traceback: {chk.out.name}/stage{number}-error.txt)", "", "failed",
                time.perf_counter() - t0)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(chk.rows) == n_rows:
        chk.add("no figure produced", "", "failed", time.perf_counter() - t0)
    print(f"[gpu_check] stage {number} ({name}) done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter (a code-path check)")
    ap.add_argument("--out", default=str(ROOT / "build"), help="directory for gpu-check.md and logs (default build/)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="peak HBM GB/s (default: from the device name)")
    ap.add_argument("--stages", default="1,2,3,4,5,6,7", help="comma-separated stage numbers to run (a rerun)")
    ap.add_argument("--with-executorch", action="store_true",
                    help="smoke: let stages 6-7 import executorch and torchao (a CUDA partition dry run; the "
                         "CLI's int4 through torchao) instead of taking the GPU machine's 'not installed' path")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    ap.add_argument("--require", default="",
                    help="comma-separated substrings: exit 1 unless a row whose stage or figure contains each is ok "
                         "(--smoke also exits 1 on any failed row)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run `make gpu-smoke` (--smoke) for the CPU code-path check")
    if not args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_check: TRITON_INTERPRET=1 on a GPU run; unset it (the kernels must be compiled)")
    ensure_fxport_importable()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chk = Check(args.smoke, args.peak_gbs, out)
    blocker = _Blocker(BLOCKED)
    if args.smoke:  # stages 1-5 as on the GPU machine: no torchao, no executorch
        sys.meta_path.insert(0, blocker)
        blocker.active = not any(n in sys.modules for n in BLOCKED)
    wanted = {int(s) for s in args.stages.split(",") if s.strip()}
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for number, name, gpu_budget, smoke_budget, fn in STAGES:
        if number not in wanted:
            continue
        if number >= 6 and args.with_executorch:
            blocker.active = False
        run_stage(chk, number, name, (smoke_budget if args.smoke else gpu_budget) * args.budget_scale, fn)
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    head = (f"# gpu-check: {chk.name}, peak {chk.peak:.0f} GB/s{' (assumed)' if args.smoke else ''}\n\n"
            f"torch {torch.__version__}, triton {_version('triton')}, TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')}, {total:.0f} s wall in all ({cpu:.0f} s CPU in this process), load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
            + (f"; {SMOKE_NOTE}: figures show that each stage's code path runs" if args.smoke else "") + "\n\n")
    text = head + table(chk.rows) + "\n"
    (out / "gpu-check.md").write_text(text)
    print(text)
    missing = []
    for want in [w.strip() for w in args.require.split(",") if w.strip()]:
        if not any(want in f"{r.stage} {r.figure}" and r.status == "ok" for r in chk.rows):
            missing.append(want)
    if missing:
        print(f"gpu_check: no ok row for {missing}", file=sys.stderr)
        return 1
    failed = [f"{r.stage}: {r.figure[:120]}" for r in chk.rows if r.status == "failed"]
    if args.smoke and failed:  # on the CPU every stage's code path must run (a GPU run reports and goes on)
        print("gpu_check --smoke: failed rows:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001
        return "not importable"


if __name__ == "__main__":
    sys.exit(main())
