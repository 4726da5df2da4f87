"""QuantizedEmbedding: formats, error bounds, and the op inside a runnable .pte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxport.quant.embedding import QuantizedEmbedding, quantize_embedding


def _emb(n=64, k=64, seed=0):
    torch.manual_seed(seed)
    e = nn.Embedding(n, k)
    with torch.no_grad():
        e.weight.normal_()
        e.weight[3, 5] = 9.0  # an outlier in one group
    return e


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32)])
def test_lookup_error_is_within_half_a_step(bits, group):
    e = _emb()
    q = QuantizedEmbedding.from_embedding(e, bits, group)
    w = e.weight.detach()
    got = q.dequantized()
    g = group or w.shape[1]
    wg = w.reshape(w.shape[0], -1, g)
    if bits == 8:
        step = wg.abs().amax(-1) / 127
    else:
        step = (wg.amax(-1) - wg.amin(-1)) / 15
    err = (got - w).reshape_as(wg).abs().amax(-1)
    # half a step, plus the fp16 rounding of scale (and zero) times the code magnitude
    assert bool((err <= 0.5 * step + 2e-3 * wg.abs().amax(-1)).all())
    ids = torch.tensor([[3, 0, 63]])
    torch.testing.assert_close(q(ids), got[ids], rtol=0, atol=0)


def test_formats_and_sizes():
    e = _emb(64, 64)
    q4 = QuantizedEmbedding.from_embedding(e, 4, 32)
    assert q4.codes.dtype == torch.uint8 and q4.codes.shape == (64, 32)
    assert q4.scales.dtype == torch.float32 and q4.scales.shape == (64, 2) and q4.zeros.shape == (64, 2)
    assert q4.nbytes() == 64 * 32 + 2 * (64 * 2 * 4)
    assert q4.row_bytes() == 32 + 16
    q8 = QuantizedEmbedding.from_embedding(e, 8, None)
    assert q8.codes.dtype == torch.int8 and q8.scales.dtype == torch.float16 and q8.scales.shape == (64,) and q8.zeros is None
    assert q8.nbytes() == 64 * 64 + 64 * 2
    # nibble order: the first column sits in the high nibble
    w = torch.zeros(1, 2)
    w[0, 0], w[0, 1] = -1.0, 1.0  # -1 -> code -8 (high), 1 -> code 7 (low)
    one = QuantizedEmbedding.from_embedding(nn.Embedding.from_pretrained(w), 4, 2)
    assert int(one.codes[0, 0]) == (0 << 4) | 15


def test_quantize_embedding_swaps_the_module_and_keeps_scale():
    from fxport.models.gemma4.model import ScaledEmbedding

    model = nn.Module()
    model.embed = ScaledEmbedding(32, 32, 0, 4.0)
    ref = model.embed(torch.tensor([1, 2]))
    q = quantize_embedding(model, "embed", bits=8, group_size=None)
    assert model.embed is q and q.embed_scale == 4.0
    torch.testing.assert_close(q(torch.tensor([1, 2])), ref, rtol=0, atol=4.0 * ref.abs().max().item() / 4 / 127)
    with pytest.raises(ValueError, match="group_size 5 does not divide embedding_dim 32"):
        QuantizedEmbedding.from_embedding(nn.Embedding(4, 32), 4, 5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_runs_in_a_pte(bits, tmp_path):
    """The op is in the program (not decomposed), and the runtime's kernel matches eager exactly."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = QuantizedEmbedding.from_embedding(_emb(), bits, 32)
            self.proj = nn.Linear(64, 8)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    m = M().eval()
    ids = torch.tensor([[3, 1, 63, 0]])
    ep = torch.export.export(m, (ids,))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    targets = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
    op = "embedding_byte" if bits == 8 else "embedding_4bit"
    assert any(op in t for t in targets), targets
    path = tmp_path / "emb.pte"
    path.write_bytes(edge.to_executorch().buffer)

    import executorch.kernels.quantized  # noqa: F401  (registers the runtime kernels)
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    got = method.execute([ids])[0]
    want = m(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lookup_from_an_int8_head_reads_its_codes():
    """The lookup built from a torchao int8 per-channel head uses the head's own tensors and
    returns exactly the head's dequantized rows (times the embedding scale)."""
    from torchao.quantization import quantize_

    from fxport.lowering.xnnpack_quant import INT4_G32, INT8_PC

    torch.manual_seed(0)
    head = nn.Linear(64, 40, bias=False)
    quantize_(head, INT8_PC.torchao_config())
    q = QuantizedEmbedding.from_int8_linear(head.weight, embed_scale=3.0)
    assert q.codes.data_ptr() == head.weight.qdata.data_ptr()
    assert q.scales.data_ptr() == head.weight.scale.data_ptr()
    assert (q.num_embeddings, q.embedding_dim, q.quant_min, q.quant_max) == (40, 64, -128, 127)
    ids = torch.tensor([[0, 39, 7, 7]])
    want = head.weight.dequantize()[ids] * 3.0
    assert torch.equal(q(ids), want)

    c = torch.linspace(0.5, 2.0, 64)  # e.g. 1 / s of the head's smoothing
    qc = QuantizedEmbedding.from_int8_linear(head.weight, embed_scale=3.0, column_scale=c)
    assert torch.equal(qc(ids), head.weight.dequantize()[ids] * c * 3.0)
    assert torch.equal(qc.dequantized(), head.weight.dequantize() * c)
    with pytest.raises(ValueError, match=r"column_scale has shape \(3,\), expected \(64,\)"):
        QuantizedEmbedding.from_int8_linear(head.weight, column_scale=torch.ones(3))

    with pytest.raises(ValueError, match="not an int8 quantized tensor .*quantize the head with an int8 per-channel rule first"):
        QuantizedEmbedding.from_int8_linear(nn.Linear(64, 40).weight)
    g = nn.Linear(64, 40, bias=False)
    quantize_(g, INT4_G32.torchao_config())
    with pytest.raises(ValueError, match=r"80 scales for 40 rows; the head must be int8 per channel"):
        QuantizedEmbedding.from_int8_linear(g.weight)
