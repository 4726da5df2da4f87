"""Triton attention kernels against an explicit fp64 softmax, launched directly.

Default (CPU machines): ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton`` in its
own process, CPU tensors. On a GPU machine ``TRITON_INTERPRET=0`` runs the same tests compiled,
on CUDA tensors (``make gpu-check`` does). The launchers are called with tiny block sizes (a
single config per call). Tolerances: fp32 inputs 2e-5 (fp32 accumulation vs fp64); fp16
inputs 4e-3 (the output is rounded to fp16, ~5e-4 relative, and P is cast to fp16 before the
P @ V product as on the GPU).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxport.kernels.reference import attention_fp64  # noqa: E402
from fxport.kernels.triton.sdpa import SdpaConfig, _sdpa_fwd, launch_sdpa  # noqa: E402
from fxport.kernels.triton.sdpa_decode_splitk import (  # noqa: E402
    DEFAULT_SMS, DecodeConfig, choose_num_splits, launch_sdpa_decode_splitk)

# FXPORT_MAX_EXAMPLES caps hypothesis examples per test (the one-shot GPU check, where every new
# shape is a kernel compile, sets it); unset: the counts below.
_MAX_EXAMPLES = int(os.environ.get("FXPORT_MAX_EXAMPLES", "0"))


def examples(n: int) -> int:
    return min(n, _MAX_EXAMPLES) if _MAX_EXAMPLES > 0 else n


INTERPRETED = type(_sdpa_fwd).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError(
        "tests/triton/test_sdpa_kernels.py needs TRITON_INTERPRET=1 before triton is imported (or a CUDA GPU with "
        "TRITON_INTERPRET=0): run `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton` in its own process"
    )
DEVICE = "cpu" if INTERPRETED else "cuda"


def _dev(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def splitk(q, k, v, m, lens, scale, cfg, causal=False):
    """The split-K launcher on DEVICE; the output back on the CPU."""
    return launch_sdpa_decode_splitk(*map(_dev, (q, k, v, m, lens)), scale, cfg, causal=causal).cpu()


def tiled(q, k, v, m, lens, scale, causal, window, cfg):
    """The tiled launcher on DEVICE; the output back on the CPU."""
    return launch_sdpa(*map(_dev, (q, k, v, m, lens)), scale, causal, window, cfg).cpu()


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
@settings(max_examples=examples(45), deadline=None)
def test_decode_splitk_matches_fp64(B, heads, D, S, mask, vl, dtype, splits, block_n, seed):
    g = torch.Generator().manual_seed(seed)
    (H_q, H_kv) = heads
    q, k, v = _qkv(g, B, H_q, H_kv, 1, S, D, dtype)
    m = _mask(g, mask, B, 1, S, dtype)
    lens = _valid_len(g, vl, B, S)
    out = splitk(q, k, v, m, lens, 0.125, DecodeConfig(block_n=block_n, num_splits=splits))
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
@settings(max_examples=examples(45), deadline=None)
def test_tiled_sdpa_matches_fp64(B, heads, D, L, S, mask, vl, causal, window, dtype, block, seed):
    g = torch.Generator().manual_seed(seed)
    (H_q, H_kv) = heads
    q, k, v = _qkv(g, B, H_q, H_kv, L, S, D, dtype)
    m = _mask(g, mask, B, L, S, dtype)
    lens = _valid_len(g, vl, B, S)
    window = window if causal else 0
    out = tiled(q, k, v, m, lens, 0.125, causal, window, SdpaConfig(block[0], block[1], 1, 1))
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
        (q, lambda x: splitk(x, k, v, None, None, 1.0, DecodeConfig(block_n=8, num_splits=3))),
        (q.expand(1, 4, 5, 64).contiguous(), lambda x: tiled(x, k, v, None, None, 1.0, False, 0, SdpaConfig(8, 8, 1, 1))),
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
    out = splitk(q, k, v, mask, lens, 0.125, DecodeConfig(block_n=8, num_splits=4))
    ref = attention_fp64(q.double(), k.nan_to_num(), v.nan_to_num(), mask, lens, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    qp = torch.randn(2, 4, 6, 64, generator=g)
    out = tiled(qp, k, v, None, lens, 0.125, False, 0, SdpaConfig(8, 8, 1, 1))
    torch.testing.assert_close(out.double(), attention_fp64(qp, k.nan_to_num(), v.nan_to_num(), None, lens, 0.125),
                               rtol=2e-5, atol=2e-5)


def test_fully_masked_rows_are_zero():
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(g, 1, 4, 2, 3, 20, 64, torch.float32)
    mask = torch.ones(1, 1, 3, 20, dtype=torch.bool)
    mask[..., 1, :] = False
    out = tiled(q, k, v, mask, None, 0.1, False, 0, SdpaConfig(8, 8, 1, 1))
    assert torch.equal(out[:, :, 1], torch.zeros(1, 4, 64))
    out = splitk(q[:, :, :1], k, v, None, torch.tensor([0]), 0.1, DecodeConfig(8, 2))
    assert torch.equal(out, torch.zeros(1, 4, 1, 64))


def test_many_splits_and_tiled_reduce():
    """40 splits (> 16 per reduce step, several empty) and D = 512 (4 head-dim slices)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = _qkv(g, 1, 4, 1, 1, 150, 512, torch.float32)
    lens = torch.tensor([97])
    out = splitk(q, k, v, None, lens, 0.05, DecodeConfig(block_n=2, num_splits=40))
    torch.testing.assert_close(out.double(), attention_fp64(q, k, v, None, lens, 0.05), rtol=2e-5, atol=2e-5)


def _tail_causal_keep(B, L, S, lens):
    """bool (B, 1, L, S): query i of the last L attends keys j <= n_b - L + i (n_b = lens[b] or S)."""
    n = torch.full((B,), S) if lens is None else lens.reshape(-1).expand(B).clamp(0, S)
    j = torch.arange(S).view(1, 1, 1, S)
    i = torch.arange(L).view(1, 1, L, 1)
    return j <= n.view(B, 1, 1, 1) - L + i


@given(
    B=st.integers(1, 2), heads=st.sampled_from(HEADS), D=st.sampled_from([16, 64, 128]),
    L=st.integers(1, 4), S=st.integers(1, 60), mask=st.sampled_from(["none", "bool", "float"]),
    vl=st.sampled_from(["none", "one", "batch"]), causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]), splits=st.integers(1, 5),
    block_n=st.sampled_from([8, 16]), seed=st.integers(0, 2**16),
)
@settings(max_examples=examples(25), deadline=None)
def test_multi_query_splitk_matches_fp64(B, heads, D, L, S, mask, vl, causal, dtype, splits, block_n, seed):
    """L_q = 1..4 (speculative verification): every query row gets its own mask row; with
    ``causal`` the L queries are the last L valid positions (bottom-right causal)."""
    g = torch.Generator().manual_seed(seed)
    (H_q, H_kv) = heads
    q, k, v = _qkv(g, B, H_q, H_kv, L, S, D, dtype)
    m = _mask(g, mask, B, L, S, dtype)
    lens = _valid_len(g, vl, B, S)
    out = splitk(q, k, v, m, lens, 0.125, DecodeConfig(block_n=block_n, num_splits=splits), causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    ref_mask = m
    if causal:
        keep = _tail_causal_keep(B, L, S, lens)
        if m is None:
            ref_mask = keep
        elif m.dtype == torch.bool:
            ref_mask = m & keep
        else:
            ref_mask = m.masked_fill(~keep, float("-inf"))
    ref = attention_fp64(q, k, v, ref_mask, lens, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_multi_query_splitk_equals_tiled_on_the_decode_mask():
    """The model's own mask for a 4-token verification step at positions 37..40 (k_pos <=
    q_pos): split-K with that mask, split-K with ``causal`` and valid_len 41, and the tiled
    kernel agree with fp64 (fp32, 2e-5)."""
    g = torch.Generator().manual_seed(13)
    q, k, v = _qkv(g, 1, 8, 2, 4, 64, 64, torch.float32)
    pos = torch.arange(37, 41)
    mask = (torch.arange(64).view(1, 64) <= pos.view(4, 1)).view(1, 1, 4, 64)
    lens = torch.tensor([41])
    ref = attention_fp64(q, k, v, mask, None, 0.125)
    for out in (splitk(q, k, v, mask, lens, 0.125, DecodeConfig(8, 3)),
                splitk(q, k, v, None, lens, 0.125, DecodeConfig(8, 3), causal=True),
                tiled(q, k, v, mask, lens, 0.125, False, 0, SdpaConfig(16, 8, 1, 1))):
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_splitk_rejects_more_than_four_queries():
    q, k, v = torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"needs 1 <= L <= 4 queries; got q \(1, 2, 5, 16\)"):
        launch_sdpa_decode_splitk(q, k, v, None, None, 1.0, DecodeConfig(8, 2))


@pytest.mark.parametrize("S, kv_programs, sms, want", [
    (4096, 4, 132, 16),  # 31B global layer, 4K: limited by >= 256 keys per split
    (32768, 4, 132, 128),  # 32K: 128 splits of 256 keys (occupancy would allow 132)
    (131072, 4, 132, 132),  # 128K: 4 programs per SM over 4 KV heads
    (131072, 2, 132, 256),  # E4B-like 2 KV heads: capped at 256 splits
    (131072, 16, 132, 33),  # many KV heads: fewer splits
    (100, 4, 132, 1),  # short: one split
    (0, 4, 132, 1),  # empty cache: still one program per KV head
    (131072, 4, 78, 78),  # a smaller GPU (78 SMs)
])
def test_choose_num_splits(S, kv_programs, sms, want):
    assert choose_num_splits(S, kv_programs, sms) == want


def test_choose_num_splits_bounds():
    for S in (0, 1, 255, 256, 1000, 4096, 65536, 262144):
        for kvp in (1, 2, 4, 8, 32, 600):
            n = choose_num_splits(S, kvp, DEFAULT_SMS)
            assert 1 <= n <= 256
            assert n == 1 or S // n >= 256  # no split below 256 keys
            assert n == 1 or kvp * (n - 1) < 4 * DEFAULT_SMS  # not more programs than needed
    with pytest.raises(ValueError, match="kv_programs >= 1"):
        choose_num_splits(100, 0, 132)
