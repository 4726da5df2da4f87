"""fxport::sdpa / fxport::sdpa_decode_splitk: CPU reference impls, fake impls, export.

The reference (:func:`fxport.kernels.reference.attention_fp64`) is independent of the ops: an
explicit fp64 softmax over gathered heads.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxport.kernels.ops  # noqa: F401
from fxport.kernels.reference import attention_fp64

# FXPORT_MAX_EXAMPLES caps hypothesis examples per test (the one-shot GPU check, where every new
# shape is a kernel compile, sets it); unset: the counts below.
_MAX_EXAMPLES = int(os.environ.get("FXPORT_MAX_EXAMPLES", "0"))


def examples(n: int) -> int:
    return min(n, _MAX_EXAMPLES) if _MAX_EXAMPLES > 0 else n


ops = torch.ops.fxport


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.sampled_from([(2, 2), (4, 2), (6, 2), (4, 1)]),  # (H_q, H_kv)
    st.integers(1, 6),  # L
    st.integers(1, 13),  # S
    st.sampled_from([8, 16]),  # D
)


def _inputs(seed, B, H_q, H_kv, L, S, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H_q, L, D, generator=g, dtype=dtype), torch.randn(B, H_kv, S, D, generator=g, dtype=dtype),
            torch.randn(B, H_kv, S, D, generator=g, dtype=dtype))


@given(shape=shapes, mask_kind=st.sampled_from(["none", "bool", "float"]), use_vl=st.booleans(),
       causal=st.booleans(), window=st.integers(0, 4), seed=st.integers(0, 2**16))
@settings(max_examples=examples(40), deadline=None)
def test_sdpa_cpu_matches_fp64(shape, mask_kind, use_vl, causal, window, seed):
    B, (H_q, H_kv), L, S, D = shape
    q, k, v = _inputs(seed, B, H_q, H_kv, L, S, D)
    g = torch.Generator().manual_seed(seed + 1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, L, S, generator=g) < 0.7
    elif mask_kind == "float":
        mask = torch.randn(B, 1, L, S, generator=g).masked_fill(torch.rand(B, 1, L, S, generator=g) < 0.3, float("-inf"))
    vl = torch.randint(0, S + 1, (B,), generator=g) if use_vl else None
    window = window if causal else 0
    out = ops.sdpa(q, k, v, mask, vl, 0.5, causal, window)
    ref = attention_fp64(q, k, v, mask, vl, 0.5, causal, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 math vs fp64


@given(shape=shapes, use_mask=st.booleans(), use_vl=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=examples(30), deadline=None)
def test_decode_cpu_matches_fp64(shape, use_mask, use_vl, seed):
    B, (H_q, H_kv), _, S, D = shape
    q, k, v = _inputs(seed, B, H_q, H_kv, 1, S, D)
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(B, 1, 1, S, generator=g) < 0.6) if use_mask else None
    vl = torch.randint(0, S + 1, (1,), generator=g) if use_vl else None
    out = ops.sdpa_decode_splitk(q, k, v, mask, vl, 0.3)
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, mask, vl, 0.3), rtol=1e-5, atol=1e-5)


def _tail_causal(B, L, S, vl):
    """bool (B, 1, L, S): query i of the last L positions attends keys j <= n - L + i."""
    n = torch.full((B,), S) if vl is None else vl.reshape(-1).expand(B)
    return torch.arange(S).view(1, 1, 1, S) <= n.view(B, 1, 1, 1) - L + torch.arange(L).view(1, 1, L, 1)


@given(shape=shapes, mask_kind=st.sampled_from(["none", "bool", "float"]), use_vl=st.booleans(),
       causal=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=examples(30), deadline=None)
def test_multi_query_decode_cpu_matches_fp64(shape, mask_kind, use_vl, causal, seed):
    """L_q = 1..4 (speculative verification): per-row masks, and ``causal`` = bottom-right."""
    B, (H_q, H_kv), L, S, D = shape
    L = min(L, 4)
    q, k, v = _inputs(seed, B, H_q, H_kv, L, S, D)
    g = torch.Generator().manual_seed(seed + 1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, L, S, generator=g) < 0.7
    elif mask_kind == "float":
        mask = torch.randn(B, 1, L, S, generator=g).masked_fill(torch.rand(B, 1, L, S, generator=g) < 0.3, float("-inf"))
    vl = torch.randint(0, S + 1, (B,), generator=g) if use_vl else None
    out = ops.sdpa_decode_splitk(q, k, v, mask, vl, 0.3, causal)
    ref_mask = mask
    if causal:
        keep = _tail_causal(B, L, S, vl)
        ref_mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool else
                                              mask.masked_fill(~keep, float("-inf")))
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, ref_mask, vl, 0.3), rtol=1e-5, atol=1e-5)


def test_large_logits_stay_exact():
    """Logits around 1e3 (no fixed max offset): fp64 reference within fp32 rounding."""
    q = torch.full((1, 2, 1, 8), 10.0)
    k = torch.randn(1, 1, 9, 8).abs() + 10.0  # q.k ~ 900..1300
    v = torch.randn(1, 1, 9, 8)
    out = ops.sdpa_decode_splitk(q, k, v, None, None, 1.0)
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v), rtol=1e-4, atol=1e-4)


def test_fully_masked_row_is_zero():
    q, k, v = _inputs(0, 1, 2, 2, 2, 5, 8)
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    out = ops.sdpa(q, k, v, mask, None, 1.0, False, 0)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))
    out = ops.sdpa_decode_splitk(q[:, :, :1], k, v, None, torch.tensor(0), 1.0)
    assert torch.equal(out, torch.zeros(1, 2, 1, 8))


def test_fp16_and_bf16_run_on_cpu():
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _inputs(3, 1, 4, 2, 1, 7, 16, dtype)
        out = ops.sdpa_decode_splitk(q, k, v, None, torch.tensor([5]), 0.25)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), attention_fp64(q, k, v, None, torch.tensor([5]), 0.25),
                                   rtol=2e-2, atol=2e-2)  # half-precision inputs and output


class Calls(torch.nn.Module):
    def forward(self, q, k, v, mask, vl):
        a = ops.sdpa_decode_splitk(q[:, :, :1], k, v, mask[:, :, :1], vl, 0.5)
        b = ops.sdpa(q, k, v, mask, vl, 0.5, True, 3)
        return a, b


def test_export_keeps_ops_and_fake_shapes():
    q, k, v = _inputs(1, 1, 4, 2, 3, 10, 8)
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    vl = torch.tensor([7])
    ep = torch.export.export(Calls(), (q, k, v, mask, vl)).run_decompositions({})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.sdpa_decode_splitk.default in targets and ops.sdpa.default in targets
    outs = [n for n in ep.graph.nodes if n.target in (ops.sdpa.default, ops.sdpa_decode_splitk.default)]
    assert {tuple(n.meta["val"].shape) for n in outs} == {(1, 4, 1, 8), (1, 4, 3, 8)}
    a, b = ep.module()(q, k, v, mask, vl)
    torch.testing.assert_close(a.double(), attention_fp64(q[:, :, :1], k, v, mask[:, :, :1], vl, 0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), attention_fp64(q, k, v, mask, vl, 0.5, True, 3), rtol=1e-5, atol=1e-5)


def test_errors_name_the_input():
    q, k, v = _inputs(0, 1, 3, 2, 1, 5, 8)
    with pytest.raises(ValueError, match=r"H_q=3 is not a multiple of H_kv=2"):
        ops.sdpa_decode_splitk(q, k, v, None, None, 1.0)
    q5, k, v = _inputs(0, 1, 4, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=r"needs 1 <= L <= 4 queries; got q \(1, 4, 5, 8\); use fxport::sdpa"):
        ops.sdpa_decode_splitk(q5, k, v, None, None, 1.0)
    q, k, v = _inputs(0, 1, 4, 2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"attn_mask must be bool \(True = attend\) or float \(additive\); got torch.int64"):
        ops.sdpa(q, k, v, torch.ones(1, 1, 2, 5, dtype=torch.long), None, 1.0, False, 0)
    with pytest.raises(ValueError, match=r"window=2 needs is_causal=True and window >= 0 \(0 = no window\)"):
        ops.sdpa(q, k, v, None, None, 1.0, False, 2)
    with pytest.raises(ValueError, match=r"valid_len must be an integer tensor; got torch.float32"):
        ops.sdpa(q, k, v, None, torch.tensor([1.0]), 1.0, False, 0)


def test_triton_impl_traces_for_aotinductor():
    """The triton_op bodies decompose (as AOTInductor decomposes them) into Triton kernel
    calls that write only their outputs/partials, with a symbolic grid for dynamic L.

    No GPU here: Triton's active driver is replaced by one reporting an sm_90 target, which is
    all the frontend needs to build TTIR for the mutation analysis.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    class Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class Both(torch.nn.Module):
        def forward(self, q, k, v, mask, vl):
            return (ops.sdpa(q, k, v, mask, vl, 0.5, True, 0),
                    ops.sdpa_decode_splitk(q[:, :, :1], k, v, mask[:, :, :1], vl, 0.5))

    q, k, v = _inputs(0, 1, 8, 2, 10, 64, 64)
    mask, vl = torch.ones(1, 1, 10, 64, dtype=torch.bool), torch.tensor([30], dtype=torch.int32)
    L = torch.export.Dim("L", min=2, max=32)
    ep = torch.export.export(Both(), (q, k, v, mask, vl), dynamic_shapes=({2: L}, None, None, {2: L}, None))
    config = triton.runtime.driver
    previous = config._active  # None on a machine without a GPU driver; restored as it was
    config.set_active(Sm90Driver())
    try:
        dec = ep.run_decompositions({}, decompose_custom_triton_ops=True)
    finally:
        config._active = previous
    calls = [n for n in dec.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert [sorted(n.kwargs["tensors_to_clone"]) for n in calls] == [["Out"], ["Acc", "Mx", "Sm"], ["Out"]]
    grid = calls[0].kwargs["grid"][0]
    assert isinstance(grid[0], torch.fx.Node) and grid[1:] == (8, 1)  # cdiv(L, BLOCK_M) is symbolic
    targets = {n.target for n in dec.graph.nodes if n.op == "call_function"}
    assert ops.sdpa.default not in targets and ops.sdpa_decode_splitk.default not in targets


# ----------------------------------------------------------------------------- on a GPU

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (the Triton kernels are tested under TRITON_INTERPRET in tests/triton)",
)
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}  # output rounding + P cast to half before P @ V


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256, 512])
def test_cuda_triton_impls_match_fp64(dtype, D):
    g = torch.Generator().manual_seed(D)
    B, H_q, H_kv, S, L = 2, 8, 2, 3001, 77
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H_q, L), (H_kv, S), (H_kv, S)))
    mask = torch.rand(1, 1, L, S, generator=g) < 0.8
    vl = torch.tensor([2500, 1703])
    dev = [t.cuda() for t in (q, k, v, mask, vl)]
    out = ops.sdpa_decode_splitk(dev[0][:, :, :1], dev[1], dev[2], dev[3][:, :, :1], dev[4], 0.1).cpu()
    ref = attention_fp64(q[:, :, :1], k, v, mask[:, :, :1], vl, 0.1)
    torch.testing.assert_close(out.double(), ref, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])
    out = ops.sdpa(*dev, 0.1, True, 0).cpu()
    ref = attention_fp64(q, k, v, mask, vl, 0.1, True, 0)
    torch.testing.assert_close(out.double(), ref, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L", [2, 4])
def test_cuda_multi_query_splitk_matches_fp64(dtype, L):
    """31B global-layer heads (H_q 32, H_kv 4, D 512), L_q = 2 / 4, bottom-right causal."""
    g = torch.Generator().manual_seed(L)
    B, H_q, H_kv, S, D = 1, 32, 4, 5000, 512
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H_q, L), (H_kv, S), (H_kv, S)))
    vl = torch.tensor([4321])
    out = ops.sdpa_decode_splitk(q.cuda(), k.cuda(), v.cuda(), None, vl.cuda(), 0.05, True).cpu()
    ref = attention_fp64(q, k, v, _tail_causal(B, L, S, vl), vl, 0.05)
    torch.testing.assert_close(out.double(), ref, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])


@cuda
def test_aoti_compiles_the_triton_ops(tmp_path):
    """AOTInductor compiles both ops (dynamic L) into one CUDA package that runs standalone."""

    class Both(torch.nn.Module):
        def forward(self, q, k, v, mask, vl):
            return (ops.sdpa(q, k, v, mask, vl, 0.25, False, 0),
                    ops.sdpa_decode_splitk(q[:, :, :1], k, v, mask[:, :, :1], vl, 0.25))

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 8, 40, 128, generator=g), torch.randn(1, 2, 4096, 128, generator=g),
            torch.randn(1, 2, 4096, 128, generator=g)]
    args = [a.to(torch.bfloat16).cuda() for a in args]
    args += [(torch.arange(4096) < 3000).view(1, 1, 1, 4096).expand(1, 1, 40, 4096).contiguous().cuda(),
             torch.tensor([3000], dtype=torch.int32).cuda()]
    L = torch.export.Dim("L", min=2, max=64)
    ep = torch.export.export(Both(), tuple(args), dynamic_shapes=({2: L}, None, None, {2: L}, None))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attention.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for n in (40, 17):  # two lengths through the same compiled program
        sub = [args[0][:, :, :n].contiguous(), args[1], args[2], args[3][:, :, :n].contiguous(), args[4]]
        for got, want in zip(runner(*sub), Both()(*sub)):
            # the same kernels and configs as eager: equal up to bf16 rounding at most
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
