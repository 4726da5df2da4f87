"""The outlier-channel split of an MLP (fxport.quant.outlier_split): exact in float, the channels
the contract names, the codes the contract promises, and a lower int8 error where it exists for.

Tolerances: the split MLP equals the unsplit one within 1e-5 relative (fp32 summation order:
the two branches' down projections are summed separately); the gate / up codes of both
branches are equal to the bit to the unsplit quantized rows; the error test asserts the split
cuts the int8 down projection's output error at least fivefold on an MLP with planted outlier channels.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxport.lowering.xnnpack_quant import INT8_PC, XnnpackRecipe, quantize_for_xnnpack
from fxport.models.gemma4.model import MLP
from fxport.quant.outlier_split import OutlierSplitMLP, split_outlier_channels
from fxport.tests.quant.test_smoothing import ByteTokenizer, _gemma3


def _mlp(hidden: int, inter: int, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    mlp = MLP(hidden, inter, "gelu_pytorch_tanh").eval().requires_grad_(False)
    return mlp


@settings(max_examples=12, deadline=None)
@given(hidden=st.integers(1, 24), inter=st.integers(2, 48), tokens=st.integers(1, 5), data=st.data())
def test_split_mlp_equals_the_mlp(hidden, inter, tokens, data):
    mlp = _mlp(hidden, inter)
    k = data.draw(st.integers(1, inter - 1))
    outliers = torch.tensor(sorted(data.draw(st.sets(st.integers(0, inter - 1), min_size=k, max_size=k))))
    split = OutlierSplitMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act, outliers)
    x = torch.randn(2, tokens, hidden)
    torch.testing.assert_close(split(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert split.gate_outliers.out_features == k and split.down_proj.in_features == inter - k
    assert torch.equal(split.down_outliers.weight, mlp.down_proj.weight[:, outliers])


def test_bad_outlier_sets_are_refused():
    mlp = _mlp(8, 16)
    for bad in (torch.tensor([], dtype=torch.long), torch.arange(16), torch.tensor([3, 3])):
        with pytest.raises(ValueError, match="outliers must be 1 to 15 distinct channels of 16"):
            OutlierSplitMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act, bad)
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        split_outlier_channels(nn.Module(), {}, 0)


def test_the_largest_absmax_channels_are_split_and_capped_at_an_eighth():
    m = _gemma3()  # 2 layers, intermediate 128: at most 16 channels each
    inter = m.config.intermediate_size
    amax = {f"model.layers.{i}.mlp.down_proj": torch.arange(inter, dtype=torch.float32).roll(7 * i)
            for i in range(2)}
    done = split_outlier_channels(m, amax, 64)
    for i in range(2):
        want = ((torch.arange(inter - 16, inter) + 7 * i) % inter).sort().values  # where the 16 largest values went
        assert torch.equal(done[f"model.layers.{i}.mlp"], want)
        assert isinstance(m.model.layers[i].mlp, OutlierSplitMLP)
    m2 = _gemma3()
    assert split_outlier_channels(m2, {"model.layers.1.mlp.down_proj": torch.ones(inter)}, 4).keys() == {"model.layers.1.mlp"}
    assert not isinstance(m2.model.layers[0].mlp, OutlierSplitMLP)  # no statistics: left alone
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj takes 128 channels but its calibration absmax has 5"):
        split_outlier_channels(_gemma3(), {"model.layers.0.mlp.down_proj": torch.ones(5)}, 4)


def test_balanced_keeps_the_outlier_down_float_and_the_gate_up_codes_of_the_unsplit_rows():
    tok = ByteTokenizer(_gemma3().config.vocab_size)
    m = _gemma3()
    rep = quantize_for_xnnpack(m, "balanced", tokenizer=tok)
    assert rep.outliers == "outlier split: 16 channel(s) of 2 MLP(s) with a float32 down projection"
    assert rep.kept_float == {f"model.layers.{i}.mlp.down_outliers": "the MLP's outlier channels (fxport.quant.outlier_split)"
                              for i in range(2)}
    assert len(rep.quantized) == 19  # 2 x (q, k, v, o, gate, up, down, gate_outliers, up_outliers) + head
    # the same smoothing without the split: each branch's gate / up codes are rows of these
    plain = _gemma3()
    quantize_for_xnnpack(plain, XnnpackRecipe("plain", ((r".*", INT8_PC),), smooth=0.5, lookup_from_head=True),
                         tokenizer=tok)
    for i in range(2):
        split, ref = m.model.layers[i].mlp, plain.model.layers[i].mlp
        keep = torch.ones(ref.down_proj.in_features, dtype=torch.bool)
        keep[split.outliers] = False
        for name in ("gate", "up"):
            whole = getattr(ref, f"{name}_proj").weight
            assert torch.equal(getattr(split, f"{name}_outliers").weight.qdata, whole.qdata[split.outliers])
            assert torch.equal(getattr(split, f"{name}_proj").weight.qdata, whole.qdata[keep])
        assert split.down_outliers.weight.dtype == torch.float32
    # the outlier indices are no buffer: torch.export would lift them into the program as an unread input
    assert not [n for n, _ in m.named_buffers() if n.endswith(".outliers")]


def test_the_split_cuts_the_int8_error_of_outlier_channels_fivefold():
    """An MLP whose intermediate channels 3 and 40 run 50x the others: int8 per-token activations
    at down_proj's input round every other channel to a coarse step; the split takes them out.
    Measured: relative output error 0.0095 -> 0.0010 (seed 0)."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    mlp = _mlp(32, 64)
    with torch.no_grad():
        for c in (3, 40):
            mlp.up_proj.weight[c] *= 50.0
    x = torch.randn(1, 200, 32)
    ref = mlp(x)
    h = mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)
    amax = h.abs().flatten(0, 1).amax(0)

    def err(split: bool) -> float:
        m = _mlp(32, 64)
        m.load_state_dict(mlp.state_dict())
        if split:
            m = OutlierSplitMLP(m.gate_proj, m.up_proj, m.down_proj, m.act, torch.topk(amax, 2).indices.sort().values)
        # only down_proj int8 (the gate / up codes are the same either way, tested above)
        quantize_(m, INT8_PC.torchao_config(), filter_fn=lambda mod, fqn: fqn == "down_proj")
        return float((m(x) - ref).norm() / ref.norm())

    plain, split = err(False), err(True)
    assert split < 0.2 * plain, (plain, split)
