"""FixedSlotFusion: exact dynamic fusion and static slots vs masked_scatter (torch.equal)."""

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxport.passes import FixedSlotFusion, PassError, apply
from fxport.passes.match import is_op

aten = torch.ops.aten
VOCAB, IMG, PAD = 32, 31, 0
DATA_DEPENDENT = (aten.masked_scatter, aten.nonzero, aten.item, aten._local_scalar_dense, aten._assert_scalar,
                  aten._is_all_true, aten.sym_constrain_range_for_size, aten._assert_async)


class Merge(torch.nn.Module):
    """The fxport model's merge: scaled embedding, tokens == id mask, masked_scatter, then a linear."""

    def __init__(self, hidden: int, image_token_id: int = IMG, vocab: int = VOCAB, check: bool = False):
        super().__init__()
        torch.manual_seed(hidden)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.out = torch.nn.Linear(hidden, 5)
        self.image_token_id, self.check, self.scale = image_token_id, check, hidden**0.5

    def forward(self, tokens, feats):  # tokens (B, L), feats (N, H) -> (B, L, 5)
        e = self.embed(tokens) * self.scale
        mask = tokens == self.image_token_id
        if self.check:  # transformers' data-dependent placeholder-count checks
            from transformers.utils.import_utils import torch_compilable_check

            n = mask.sum()
            torch_compilable_check(n * e.shape[-1] == feats.numel(), "mismatch")
            torch_compilable_check(e[mask[..., None].expand_as(e)].numel() == feats.numel(), "mismatch")
        e = e.masked_scatter(mask[..., None].expand_as(e), feats)
        return self.out(e)


@functools.lru_cache(maxsize=None)
def _dynamic_programs(batch: int, hidden: int, check: bool = False):
    """(module, unrewritten, rewritten) with L in [1, 12] and N in [1, 24] dynamic (N = 2B with checks)."""
    m = Merge(hidden, check=check).eval()
    tokens = torch.tensor([[IMG, 1, IMG]] * batch)
    feats = torch.randn(2 * batch, hidden)
    n_dim = None if check else {0: torch.export.Dim("N", min=1, max=24)}  # checks tie N to L
    shapes = ({1: torch.export.Dim("L", min=1, max=12)}, n_dim)
    ep = torch.export.export(m, (tokens, feats), dynamic_shapes=shapes).run_decompositions({})
    res = apply(ep, [FixedSlotFusion(pad_token_id=PAD)], dump=False)
    return m, ep, res


def _ops(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function"]


def _tokens(batch, length, positions):
    g = torch.Generator().manual_seed(batch * 100 + length)
    tokens = torch.randint(1, IMG, (batch, length), generator=g)
    flat = tokens.view(-1)
    flat[list(positions)] = IMG
    return tokens


@settings(max_examples=25, deadline=None)
@given(
    batch=st.sampled_from([1, 2]),
    hidden=st.sampled_from([4, 8]),
    data=st.data(),
)
def test_dynamic_equals_masked_scatter(batch, hidden, data):
    length = data.draw(st.integers(1, 12))
    positions = data.draw(st.sets(st.integers(0, batch * length - 1)))
    extra = data.draw(st.integers(0, 2))  # masked_scatter ignores extra feature rows
    n = max(len(positions) + extra, 1)
    m, ep, res = _dynamic_programs(batch, hidden)
    tokens, feats = _tokens(batch, length, positions), torch.randn(n, hidden)
    with torch.no_grad():
        expected = m(tokens, feats)
    assert torch.equal(res.ep.module()(tokens, feats), expected)
    assert torch.equal(ep.module()(tokens, feats), expected)


def test_zero_and_all_placeholders():
    m, _, res = _dynamic_programs(2, 8)
    for tokens in (torch.full((2, 5), 3), torch.full((2, 5), IMG)):
        feats = torch.randn(10, 8)
        with torch.no_grad():
            assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))


def test_feature_rows_bounded_by_an_expression_gather_without_a_zero_row():
    """Features (2, N, H) with N in [1, 24]: rows = 2 * N >= 2 (fxport.passes.graph.bounds reads an
    expression's lowest value through its symbols), so the gather reads the features directly
    (no zero row prepended); outputs equal masked_scatter's."""
    m = Merge(8).eval()
    tokens = torch.tensor([[IMG, 1, IMG]] * 2)
    shapes = ({1: torch.export.Dim("L", min=1, max=12)}, {1: torch.export.Dim("N", min=1, max=24)})
    ep = torch.export.export(m, (tokens, torch.randn(2, 2, 8)), dynamic_shapes=shapes).run_decompositions({})
    res = apply(ep, [FixedSlotFusion(pad_token_id=PAD)], dump=False)
    ops = _ops(res.ep)
    assert sum(is_op(n, aten.clamp) for n in ops) == 1 and not any(is_op(n, aten.new_zeros) for n in ops)
    for length, positions in ((3, {0, 2, 3, 5}), (5, {1, 2, 3, 6, 7, 9})):
        tokens = _tokens(2, length, positions)
        feats = torch.randn(2, len(positions) // 2, 8)  # as many rows as placeholders
        with torch.no_grad():
            assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))


def test_graph_structure_and_stats():
    _, ep, res = _dynamic_programs(1, 8)
    (record,) = res.records
    feats = next(n for n in ep.graph.nodes if n.name == "feats")
    assert record.changed and record.stats.matched == 1 and record.stats.rewritten == 1
    assert record.stats.sites == [
        {
            "merge": "masked_scatter",
            "placeholder_id": IMG,
            "mode": "dynamic",
            "feature_rows": str(feats.meta["val"].shape[0]),  # the symbolic N
            "embeddings_padded": 1,
            "checks_removed": 0,
        }
    ]
    ops = _ops(res.ep)
    assert not any(is_op(n, DATA_DEPENDENT) for n in ops)
    assert sum(is_op(n, aten.cumsum) for n in ops) == 1 and sum(is_op(n, aten.where) for n in ops) == 2
    emb = next(n for n in ops if is_op(n, aten.embedding))
    # embedding(w, where(tokens == IMG, PAD, tokens))
    assert is_op(emb.args[1], aten.where.ScalarSelf) and emb.args[1].args[1] == PAD
    assert is_op(emb.args[1].args[0], aten.eq.Scalar) and emb.args[1].args[0].args[1] == IMG


def test_second_application_changes_nothing():
    _, _, res = _dynamic_programs(1, 8)
    again = apply(res.ep, [FixedSlotFusion()], dump=False)
    assert not again.changed and again.ep is res.ep
    assert again.records[0].stats.as_dict() == {
        "matched": 0, "rewritten": 0, "skipped": {"no masked_scatter in the graph": 1}, "sites": []
    }


def test_transformers_checks_removed():
    m, ep, res = _dynamic_programs(1, 8, check=True)
    before = _ops(ep)
    assert sum(is_op(n, aten._assert_scalar) for n in before) >= 2 and any(is_op(n, aten.item) for n in before)
    site = res.records[0].stats.sites[0]
    assert site["checks_removed"] == sum(is_op(n, aten._assert_scalar) for n in before)
    assert not any(is_op(n, DATA_DEPENDENT) or is_op(n, aten.index.Tensor) for n in _ops(res.ep))
    tokens = torch.tensor([[4, IMG, 5, 6, IMG, 9]])
    feats = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))


def test_out_of_vocabulary_placeholder_is_padded():
    """The placeholder id is outside the vocabulary: only the rewritten program can run it."""
    m = Merge(8, image_token_id=VOCAB + 7).eval()
    tokens, feats = torch.tensor([[1, VOCAB + 7, 2, VOCAB + 7]]), torch.randn(2, 8)
    ep = torch.export.export(m, (torch.tensor([[1, 2, 3, 4]]), feats))
    res = apply(ep, [FixedSlotFusion(pad_token_id=PAD)], dump=False)
    with pytest.raises(IndexError):
        ep.module()(tokens, feats)
    with torch.no_grad():  # independent reference: pad ids embedded, then masked_scatter
        e = m.embed(torch.tensor([[1, PAD, 2, PAD]])) * m.scale
        expected = m.out(e.masked_scatter((tokens == VOCAB + 7)[..., None].expand_as(e), feats))
    assert torch.equal(res.ep.module()(tokens, feats), expected)


def test_possibly_empty_features_use_a_zero_row():
    m = Merge(4).eval()
    shapes = ({1: torch.export.Dim("L", min=1, max=8)}, {0: torch.export.Dim("N", min=0, max=8)})
    ep = torch.export.export(m, (torch.tensor([[IMG, 1, IMG]]), torch.randn(2, 4)), dynamic_shapes=shapes)
    res = apply(ep, [FixedSlotFusion()], dump=False)
    assert any(is_op(n, aten.cat) for n in _ops(res.ep))
    for tokens, n in ((torch.tensor([[1, 2, 3]]), 0), (torch.tensor([[IMG, 2, IMG, 5]]), 2)):
        feats = torch.randn(n, 4)
        with torch.no_grad():
            assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))


def test_left_alone_with_reason():
    class EmbedsMask(Merge):  # transformers' inputs_embeds path: mask = (e == embed(id)).all(-1)
        def forward(self, tokens, feats):
            e = self.embed(tokens)
            mask = (e == self.embed.weight[IMG]).all(-1)
            return self.out(e.masked_scatter(mask[..., None].expand_as(e), feats))

    ep = torch.export.export(EmbedsMask(4), (torch.tensor([[IMG, 1]]), torch.randn(1, 4)))
    res = apply(ep, [FixedSlotFusion()], dump=False)
    assert not res.changed
    assert dict(res.records[0].stats.skipped) == {"mask is not tokens == constant broadcast over the hidden dim": 1}
    _, ep, _ = _dynamic_programs(1, 8)
    res = apply(ep, [FixedSlotFusion(placeholder_token_id=5)], dump=False)
    assert not res.changed and dict(res.records[0].stats.skipped) == {f"placeholder id {IMG} not in placeholder_token_id": 1}


# ----------------------------------------------------------------------------- static slots


def _static_program(batch, length, hidden, slots, rows, dynamic_min=None):
    m = Merge(hidden).eval()
    tokens = torch.ones(batch, length, dtype=torch.long)
    shapes = None
    if dynamic_min is not None:
        shapes = ({1: torch.export.Dim("L", min=dynamic_min, max=16)}, None)
    ep = torch.export.export(m, (tokens, torch.randn(rows, hidden)), dynamic_shapes=shapes)
    return m, apply(ep, [FixedSlotFusion(mode="static", slots=slots, pad_token_id=PAD)], dump=False)


@st.composite
def slot_layouts(draw):
    """(L, slots): gaps >= 0 (adjacent slots, a slot at 0) and a tail >= 0 (a slot ending at L)."""
    slots, cursor = [], 0
    for gap, n in draw(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=4)):
        slots.append((cursor + gap, n))
        cursor += gap + n
    return cursor + draw(st.integers(0, 3)), slots


@settings(max_examples=8, deadline=None)
@given(batch=st.sampled_from([1, 2]), layout=slot_layouts())
def test_static_slots_equal_masked_scatter(batch, layout):
    length, slots = layout
    total = sum(n for _, n in slots)
    m, res = _static_program(batch, length, 4, slots, batch * total)
    positions = [b * length + s + i for b in range(batch) for s, n in slots for i in range(n)]
    tokens, feats = _tokens(batch, length, positions), torch.randn(batch * total, 4)
    with torch.no_grad():
        assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))
    slices = [n for n in _ops(res.ep) if is_op(n, aten.slice)]
    assert all(n.meta["val"].shape[1] > 0 for n in slices)  # never a zero-length slice
    assert not any(is_op(n, DATA_DEPENDENT) or is_op(n, aten.cumsum) for n in _ops(res.ep))


def test_static_dynamic_length_uses_slice_scatter():
    m, res = _static_program(1, 8, 4, [(2, 3)], 3, dynamic_min=5)
    assert sum(is_op(n, aten.slice_scatter) for n in _ops(res.ep)) == 1
    for length in (5, 6, 11):
        tokens = _tokens(1, length, [2, 3, 4])
        feats = torch.randn(3, 4)
        with torch.no_grad():
            assert torch.equal(res.ep.module()(tokens, feats), m(tokens, feats))


def test_static_feature_count_mismatch():
    with pytest.raises(
        PassError,
        match=r"^FixedSlotFusion: slots \[\(1, 2\), \(5, 1\)\] hold 3 rows per sequence x batch 2 = 6, "
        r"but features feats have 4 rows of size 4; fix slots= or the feature count\.$",
    ):
        _static_program(2, 8, 4, [(1, 2), (5, 1)], 4)


def test_static_slots_past_dynamic_length():
    with pytest.raises(PassError, match=r"^FixedSlotFusion: slots end at 6 but the sequence length of .* is s\d+ "
                       r"\(range \[4, 16\]\); static slots need a sequence length >= 6 for every input\."):
        _static_program(1, 8, 4, [(2, 4)], 4, dynamic_min=4)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"^FixedSlotFusion: mode='static' needs slots=\[\(start, length\), \.\.\.\]$"):
        FixedSlotFusion(mode="static")
    with pytest.raises(ValueError, match="must be sorted, non-overlapping"):
        FixedSlotFusion(mode="static", slots=[(3, 2), (4, 1)])
    with pytest.raises(ValueError, match="must be sorted, non-overlapping"):
        FixedSlotFusion(mode="static", slots=[(0, 0)])
    with pytest.raises(ValueError, match=r"^FixedSlotFusion: mode='fixed'; use 'dynamic' or 'static'$"):
        FixedSlotFusion(mode="fixed")


# ----------------------------------------------------------------------------- fxport Gemma 4


def test_gemma4_multimodal_prefill_logits_identical():
    """Tiny Gemma 4 (PLE, sliding + full layers), 2 layers to keep export time low."""
    from fxport.models.gemma4.config import get_preset
    from fxport.models.gemma4.export import export_methods
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    cfg = dataclasses.replace(
        get_preset("tiny"), num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0
    )
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(cfg, max_seq_len=16).eval()
    programs = export_methods(model, max_prefill_chunk=8, multimodal=True)
    fusion = FixedSlotFusion(pad_token_id=cfg.pad_token_id)
    res = apply(programs["prefill"], [fusion], method="prefill", dump=False)
    assert res.records[0].stats.rewritten == 1 and res.records[0].stats.sites[0]["embeddings_padded"] == 1
    assert not any(is_op(n, DATA_DEPENDENT) for n in _ops(res.ep))
    img = cfg.image_token_id
    for tokens in ([[5, img, img, 9, img, 3, 2]], [[img] * 8], [[4, 8, 15, 16]]):
        tokens = torch.tensor(tokens)
        L = tokens.shape[1]
        feats = torch.randn(max(int((tokens == img).sum()), 1), cfg.hidden_size)
        pos = torch.arange(L)
        expected = programs["prefill"].module()(tokens, pos, feats)
        with torch.no_grad():
            assert torch.equal(model(tokens, pos, feats), expected)  # the export itself is exact
        assert torch.equal(res.ep.module()(tokens, pos, feats), expected)  # bit-identical logits
    decode = apply(programs["decode"], [fusion], method="decode", dump=False)
    assert not decode.changed and decode.ep is programs["decode"]


def test_two_merges_pad_both_ids():
    """Image and audio placeholders (two merges on the same ids); one embedding padded for both."""
    AUDIO = 30

    class TwoMerges(Merge):
        def forward(self, tokens, image, audio):
            e = self.embed(tokens) * self.scale
            e = e.masked_scatter((tokens == IMG)[..., None].expand_as(e), image)
            e = e.masked_scatter((tokens == AUDIO)[..., None].expand_as(e), audio)
            return self.out(e)

    m = TwoMerges(4).eval()
    tokens = torch.tensor([[IMG, 1, AUDIO, IMG, 5, AUDIO, AUDIO]])
    image, audio = torch.randn(2, 4), torch.randn(3, 4)
    ep = torch.export.export(m, (tokens, image, audio))
    res = apply(ep, [FixedSlotFusion(pad_token_id=PAD)], dump=False)
    assert [(s["placeholder_id"], s["embeddings_padded"]) for s in res.records[0].stats.sites] == [(IMG, 1), (AUDIO, 1)]
    emb = next(n for n in _ops(res.ep) if is_op(n, aten.embedding))
    chain = emb.args[1]  # where(tokens == AUDIO, PAD, where(tokens == IMG, PAD, tokens))
    assert is_op(chain, aten.where.ScalarSelf) and chain.args[0].args[1] == AUDIO
    assert is_op(chain.args[2], aten.where.ScalarSelf) and chain.args[2].args[0].args[1] == IMG
    for toks in (tokens, torch.tensor([[AUDIO, IMG, IMG, 2, AUDIO, AUDIO, 3]])):
        with torch.no_grad():
            assert torch.equal(res.ep.module()(toks, image, audio), m(toks, image, audio))
