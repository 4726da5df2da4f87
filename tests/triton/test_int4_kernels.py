"""Triton int4 kernels against the CPU reference impls of the ops (fp32 dequant, fp32 accumulation).

Default: TRITON_INTERPRET=1, CPU tensors, launchers called directly. On a GPU machine run with
``TRITON_INTERPRET=0`` to launch the same tests on CUDA tensors, plus the CUDA-only checks at
the end (the ``torch.library`` ops dispatching to Triton, AOTInductor compiling a rewritten
program); those are skipped where no GPU is usable.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxport.kernels.int4_ops import int4_dequant_reference, int4_gemv_reference  # noqa: E402
from fxport.kernels.triton.int4_dequant import int4_dequant_launch  # noqa: E402
from fxport.kernels.triton.int4_gemv import gemv_config, int4_gemv_launch  # noqa: E402
from fxport.quant.packed import pack_int4  # noqa: E402

# FXPORT_MAX_EXAMPLES caps hypothesis examples per test (the one-shot GPU check, where every new
# shape is a kernel compile, sets it); unset: the counts below.
_MAX_EXAMPLES = int(os.environ.get("FXPORT_MAX_EXAMPLES", "0"))


def examples(n: int) -> int:
    return min(n, _MAX_EXAMPLES) if _MAX_EXAMPLES > 0 else n


CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")


def _dev(*ts):
    return tuple(t.to(DEVICE) for t in ts)


def _weight(n, k, g, seed, scale_dtype=torch.float32, fractional_zeros=True):
    gen = torch.Generator().manual_seed(seed)
    packed = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    zeros = torch.rand(n, k // g, generator=gen) * 15
    zeros = (zeros if fractional_zeros else zeros.round()).to(scale_dtype)
    return packed, scales, zeros


@given(
    n=st.integers(1, 80),
    k_groups=st.integers(1, 6),
    g=st.sampled_from([16, 32, 48, 64, 128]),  # 48: not a power of two (per-column scale loads)
    m=st.sampled_from([1, 2, 5, 64]),
    split_k=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=examples(30), deadline=None)
@example(n=33, k_groups=3, g=48, m=5, split_k=3, seed=1)  # per-column scale path, split-K
@example(n=64, k_groups=4, g=128, m=64, split_k=None, seed=2)  # several M blocks
def test_gemv_matches_reference(n, k_groups, g, m, split_k, seed):
    k = g * k_groups
    packed, scales, zeros = _weight(n, k, g, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    got = int4_gemv_launch(*_dev(x, packed, scales, zeros), g, split_k=split_k).cpu()
    want = int4_gemv_reference(x, packed, scales, zeros, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k**0.5)  # fp32 accumulation order


@pytest.mark.parametrize("x_dtype,scale_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_gemv_half_inputs(x_dtype, scale_dtype):
    packed, scales, zeros = _weight(40, 256, 32, 0, scale_dtype)
    x = torch.randn(1, 3, 256).to(x_dtype)  # (B, L, K): leading dims are flattened into M
    got = int4_gemv_launch(*_dev(x, packed, scales, zeros), 32).cpu()
    want = int4_gemv_reference(x, packed, scales, zeros, 32)
    assert got.shape == (1, 3, 40) and got.dtype == x_dtype
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # one rounding of the fp32 sum to x's dtype


@given(
    n=st.integers(1, 70),
    k_groups=st.integers(1, 5),
    g=st.sampled_from([2, 6, 32, 64, 256]),  # 6: not a power of two (per-column scale loads)
    dtype=st.sampled_from([torch.float32, torch.float16]),
    fractional=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=examples(20), deadline=None)
@example(n=9, k_groups=5, g=6, dtype=torch.float16, fractional=True, seed=3)  # per-column scale path
def test_dequant_matches_reference_exactly(n, k_groups, g, dtype, fractional, seed):
    k = g * k_groups
    packed, scales, zeros = _weight(n, k, g, seed, fractional_zeros=fractional)
    got = int4_dequant_launch(*_dev(packed, scales, zeros), g, dtype).cpu()
    want = int4_dequant_reference(packed, scales, zeros, g, dtype)
    assert got.dtype == dtype and torch.equal(got, want)  # same formula, same rounding steps


def test_traceable_launch_under_interpreter():
    packed, scales, zeros = _weight(16, 64, 32, 1)
    x = torch.randn(1, 64)
    torch.testing.assert_close(
        int4_gemv_launch(*_dev(x, packed, scales, zeros), 32, traceable=True).cpu(),
        int4_gemv_reference(x, packed, scales, zeros, 32),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("n,k", [(5376, 5376), (8192, 5376), (5376, 8192), (43008, 5376), (5376, 21504)])
def test_gemv_config_reads_weight_once_and_fills_h100(n, k):
    """31B-like shapes, M = 1: one M block (every byte read once), K splits disjoint and
    covering K, and at least one program per SM of an H100 (132 SMs)."""
    k2 = k // 2
    cfg = gemv_config(1, n, k2, num_sms=132)
    assert cfg["BLOCK_M"] == 1
    assert (cfg["SPLIT"] - 1) * cfg["K2_PER_SPLIT"] < k2 <= cfg["SPLIT"] * cfg["K2_PER_SPLIT"]
    programs = -(-n // cfg["BLOCK_N"]) * cfg["SPLIT"]
    assert programs >= 132


@needs_cuda
def test_ops_dispatch_to_triton_on_cuda():
    import fxport.kernels.int4_ops  # noqa: F401

    packed, scales, zeros = _weight(96, 512, 32, 5, torch.bfloat16, fractional_zeros=False)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    got = torch.ops.fxport.int4_gemv(*_dev(x, packed, scales, zeros), 32).cpu()
    torch.testing.assert_close(got, int4_gemv_reference(x, packed, scales, zeros, 32), rtol=2e-2, atol=2e-2)
    w = torch.ops.fxport.int4_dequant(*_dev(packed, scales, zeros), 32, torch.bfloat16).cpu()
    assert torch.equal(w, int4_dequant_reference(packed, scales, zeros, 32, torch.bfloat16))


@needs_cuda
def test_aoti_compiles_rewritten_decode_program(tmp_path):
    """AOTInductor compiles a program rewritten by Int4Dispatch (int4_gemv inside) and runs it."""
    import torch.nn.functional as F

    from fxport.passes.base import PassContext
    from fxport.passes.int4_dispatch import Int4Dispatch
    from fxport.quant.linear import to_quantized_linears
    from fxport.quant.quantize import quantize_minmax

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 128, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = One()
    qws = {"proj.weight": quantize_minmax(model.proj.weight, 4, 32, scale_dtype=torch.bfloat16)}
    to_quantized_linears(model, qws)
    model = model.to("cuda")
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,)).run_decompositions({})
    ep = Int4Dispatch()(ep, PassContext("decode")).ep
    assert torch.ops.fxport.int4_gemv.default in [n.target for n in ep.graph.nodes]
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    ref = F.linear(x.float(), qws["proj.weight"].dequantize(torch.float32).cuda())
    torch.testing.assert_close(runner(x).float(), ref, rtol=2e-2, atol=2e-2)
