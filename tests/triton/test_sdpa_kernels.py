"""Triton attention kernels under TRITON_INTERPRET=1 (CPU tensors, launched directly).

Run in its own process: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton``.
The launchers are called directly with tiny block sizes (a single config per call) and
compared against an explicit fp64 softmax. Tolerances: fp32 inputs 2e-5 (fp32 accumulation
vs fp64); fp16 inputs 4e-3 (the output is rounded to fp16, ~5e-4 relative, and P is cast to
fp16 before the P @ V product as on the GPU).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxport.kernels.reference import attention_fp64  # noqa: E402
from fxport.kernels.triton.sdpa import SdpaConfig, _sdpa_fwd, launch_sdpa  # noqa: E402
from fxport.kernels.triton.sdpa_decode_splitk import DecodeConfig, launch_sdpa_decode_splitk  # noqa: E402

if type(_sdpa_fwd).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "tests/triton/test_sdpa_kernels.py needs TRITON_INTERPRET=1 before triton is imported: run "
        "`TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton` in its own process"
    )


TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
HEADS = [(2, 2), (4, 2), (8, 2), (3, 1), (4, 1)]


def _qkv(g, B, H_q, H_kv, L, S, D, dtype):
    return (torch.randn(B, H_q, L, D, generator=g).to(dtype), torch.randn(B, H_kv, S, D, generator=g).to(dtype),
            torch.randn(B, H_kv, S, D, generator=g).to(dtype))


def _mask(g, kind, B, L, S, dtype):
    if kind == "none":
        return None
    if kind == "bool":  # gathered-looking, non-contiguous: a transposed (S, L) tensor
        return (torch.rand(S, L, generator=g) < 0.7).t().reshape(1, 1, L, S) if L == 1 else \
            (torch.rand(1, 1, S, L, generator=g) < 0.7).transpose(-1, -2)
    add = torch.randn(B, 1, L, S, generator=g).masked_fill(torch.rand(B, 1, L, S, generator=g) < 0.3, float("-inf"))
    return add.to(dtype)


def _valid_len(g, kind, B, S):
    if kind == "none":
        return None
    n = 1 if kind == "one" else B
    return torch.randint(0, S + 1, (n,), generator=g)


@given(
    B=st.integers(1, 2), heads=st.sampled_from(HEADS), D=st.sampled_from([64, 128, 256, 512]),
    S=st.integers(1, 70), mask=st.sampled_from(["none", "bool", "float"]),
    vl=st.sampled_from(["none", "one", "batch"]), dtype=st.sampled_from([torch.float32, torch.float16]),
    splits=st.integers(1, 4), block_n=st.sampled_from([8, 16]), seed=st.integers(0, 2**16),
)
@settings(max_examples=45, deadline=None)
def test_decode_splitk_matches_fp64(B, heads, D, S, mask, vl, dtype, splits, block_n, seed):
    g = torch.Generator().manual_seed(seed)
    (H_q, H_kv) = heads
    q, k, v = _qkv(g, B, H_q, H_kv, 1, S, D, dtype)
    m = _mask(g, mask, B, 1, S, dtype)
    lens = _valid_len(g, vl, B, S)
    out = launch_sdpa_decode_splitk(q, k, v, m, lens, 0.125, DecodeConfig(block_n=block_n, num_splits=splits))
    assert out.shape == q.shape and out.dtype == dtype
    ref = attention_fp64(q, k, v, m, lens, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@given(
    B=st.integers(1, 2), heads=st.sampled_from(HEADS), D=st.sampled_from([64, 128, 256, 512]),
    L=st.integers(1, 20), S=st.integers(1, 40), mask=st.sampled_from(["none", "bool", "float"]),
    vl=st.sampled_from(["none", "one", "batch"]), causal=st.booleans(), window=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.float16]), block=st.sampled_from([(8, 8), (16, 8), (8, 16)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=45, deadline=None)
def test_tiled_sdpa_matches_fp64(B, heads, D, L, S, mask, vl, causal, window, dtype, block, seed):
    g = torch.Generator().manual_seed(seed)
    (H_q, H_kv) = heads
    q, k, v = _qkv(g, B, H_q, H_kv, L, S, D, dtype)
    m = _mask(g, mask, B, L, S, dtype)
    lens = _valid_len(g, vl, B, S)
    window = window if causal else 0
    out = launch_sdpa(q, k, v, m, lens, 0.125, causal, window, SdpaConfig(block[0], block[1], 1, 1))
    ref = attention_fp64(q, k, v, m, lens, 0.125, causal, window)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_exact_against_fp64(dtype):
    """Logits ~1e3 with a spread of ~300: a fixed offset would overflow exp or flush to 0.

    fp32 logits of 1e3 carry ~1e3 * 2^-24 * sqrt(D) ~ 5e-4 absolute error, which moves the
    softmax weights by as much; so the bound is 1e-3 (fp32) / 4e-3 (fp16 output), and the
    kernels must be no worse than aten's own fp32 SDPA on the same inputs (x2 + 1e-6).
    """
    g = torch.Generator().manual_seed(7)
    q = torch.full((1, 4, 1, 64), 4.0).to(dtype)
    k = (4.0 + torch.rand(1, 2, 45, 64, generator=g)).to(dtype)  # q.k in ~1000..1300
    v = torch.randn(1, 2, 45, 64, generator=g).to(dtype)
    tol = max(TOL[dtype], 1e-3)
    for qq, run in (
        (q, lambda x: launch_sdpa_decode_splitk(x, k, v, None, None, 1.0, DecodeConfig(block_n=8, num_splits=3))),
        (q.expand(1, 4, 5, 64).contiguous(), lambda x: launch_sdpa(x, k, v, None, None, 1.0, False, 0, SdpaConfig(8, 8, 1, 1))),
    ):
        out = run(qq)
        ref = attention_fp64(qq, k, v, None, None, 1.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        aten32 = torch.nn.functional.scaled_dot_product_attention(
            qq.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), scale=1.0)
        err, err_aten = (out.double() - ref).abs().max().item(), (aten32.double() - ref).abs().max().item()
        if dtype == torch.float32:
            assert err <= 2 * err_aten + 1e-6, (err, err_aten)


def test_blocks_past_valid_len_are_not_read():
    """NaN in K and V beyond valid_len (mask True there): a kernel that loaded those blocks
    and masked afterwards would produce NaN (0 * NaN in P @ V)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = _qkv(g, 2, 4, 2, 1, 64, 64, torch.float32)
    lens = torch.tensor([9, 40])
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    out = launch_sdpa_decode_splitk(q, k, v, mask, lens, 0.125, DecodeConfig(block_n=8, num_splits=4))
    ref = attention_fp64(q.double(), k.nan_to_num(), v.nan_to_num(), mask, lens, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    qp = torch.randn(2, 4, 6, 64, generator=g)
    out = launch_sdpa(qp, k, v, None, lens, 0.125, False, 0, SdpaConfig(8, 8, 1, 1))
    torch.testing.assert_close(out.double(), attention_fp64(qp, k.nan_to_num(), v.nan_to_num(), None, lens, 0.125),
                               rtol=2e-5, atol=2e-5)


def test_fully_masked_rows_are_zero():
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(g, 1, 4, 2, 3, 20, 64, torch.float32)
    mask = torch.ones(1, 1, 3, 20, dtype=torch.bool)
    mask[..., 1, :] = False
    out = launch_sdpa(q, k, v, mask, None, 0.1, False, 0, SdpaConfig(8, 8, 1, 1))
    assert torch.equal(out[:, :, 1], torch.zeros(1, 4, 64))
    out = launch_sdpa_decode_splitk(q[:, :, :1], k, v, None, torch.tensor([0]), 0.1, DecodeConfig(8, 2))
    assert torch.equal(out, torch.zeros(1, 4, 1, 64))


def test_many_splits_and_tiled_reduce():
    """40 splits (> 16 per reduce step, several empty) and D = 512 (4 head-dim slices)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = _qkv(g, 1, 4, 1, 1, 150, 512, torch.float32)
    lens = torch.tensor([97])
    out = launch_sdpa_decode_splitk(q, k, v, None, lens, 0.05, DecodeConfig(block_n=2, num_splits=40))
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, None, lens, 0.05), rtol=2e-5, atol=2e-5)
