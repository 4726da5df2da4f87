"""debug.dump (fxport dump, per-pass files) and debug.histogram."""

from collections import Counter

import pytest
import torch

from fxport.debug import delta_text, diff_text, dump_program, histogram_text, op_histogram, write_pass_dump

aten = torch.ops.aten


class Merge(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.register_buffer("k_cache", torch.zeros(1, 6, 4))

    def forward(self, tokens, feats):  # tokens (1, L), feats (N, 4)
        e = self.emb(tokens)
        e = e.masked_scatter((tokens == 3)[..., None].expand_as(e), feats)
        self.k_cache[:, : tokens.shape[1]] = e
        return e * 2.0


def _ep():
    L = torch.export.Dim("L", min=2, max=6)
    ep = torch.export.export(Merge(), (torch.tensor([[1, 3, 2]]), torch.randn(1, 4)), dynamic_shapes=({1: L}, None))
    return ep.run_decompositions({})


def test_dump_program_sections(tmp_path):
    ep = _ep()
    path = tmp_path / "prog.pt2"
    torch.export.save(ep, str(path))
    text = dump_program(path)
    lines = text.splitlines()
    assert lines[0] == f"# {path}"
    (sym,) = [str(s) for s in ep.range_constraints]  # the dynamic length L, e.g. "s27"
    assert lines[1] == f"symbolic ranges: {sym}: [2, 6]"
    assert lines[2] == f"signature: forward(tokens: int64[1, {sym}], feats: float32[1, 4]) -> (float32[1, {sym}, 4])"
    assert "## user inputs (2)" in text and "## buffers (1)" in text and "## outputs (2)" in text
    buf = lines[lines.index("## buffers (1)") + 1].split()
    assert buf == ["k_cache", "float32[1,", "6,", "4]", "persistent"]
    par = lines[lines.index("## parameters and constants (1, 0.00 MiB)") + 1].split()
    assert par == ["emb.weight", "float32[16,", "4]", "parameter"]
    hist_start = lines.index("## op histogram") + 1
    assert "1  aten.masked_scatter.default" in lines[hist_start : lines.index("## graph")]
    assert "class GraphModule" in text and "# graph signature" in text
    # Same report from the in-memory program (apart from the title line).
    assert dump_program(ep).splitlines()[1:] == lines[1:]
    assert "## graph" not in dump_program(ep, graph=False)


def test_dump_program_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fxport dump: .*nope\.pt2 does not exist; pass a file written by torch.export.save"):
        dump_program(tmp_path / "nope.pt2")


def test_histogram_and_delta():
    ep = _ep()
    hist = op_histogram(ep)
    assert hist["aten.masked_scatter.default"] == 1 and hist["aten.embedding.default"] == 1
    assert "placeholder" not in hist and "output" not in hist
    text = histogram_text(Counter({"a": 1, "b": 3}))
    assert text == "3  b\n1  a\n4  total\n"
    assert histogram_text(Counter()) == "(no ops)\n"
    delta = delta_text(Counter({"x": 2, "y": 1}), Counter({"x": 2, "z": 4})).splitlines()
    assert [l.split() for l in delta] == [
        ["before", "after", "delta", "op"],
        ["1", "0", "-1", "y"],
        ["0", "4", "+4", "z"],
        ["3", "6", "+3", "total"],
    ]
    assert "(no change)" in delta_text(Counter({"x": 1}), Counter({"x": 1}))


def test_write_pass_dump_unchanged(tmp_path):
    ep = _ep()
    paths = write_pass_dump(tmp_path, 3, "noop", ep, ep, changed=False, stats={"matched": 0})
    assert [p.name for p in paths][:5] == [
        "03_noop.before.txt",
        "03_noop.after.txt",
        "03_noop.diff",
        "03_noop.ops.txt",
        "03_noop.stats.json",
    ]
    assert paths[0].read_text() == paths[1].read_text() and paths[2].read_text() == ""
    assert diff_text("a\nb\n", "a\nc\n", "g") == "--- g.before\n+++ g.after\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n"


def test_model_explorer_file_when_available(tmp_path, monkeypatch):
    import fxport.debug.dump as D

    ep = _ep()
    monkeypatch.setattr(D, "model_explorer_available", lambda: True)
    paths = write_pass_dump(tmp_path, 1, "noop", ep, ep, changed=False, stats={})
    assert paths[-1].name == "01_noop.after.pt2"  # Model Explorer opens .pt2 files directly
    loaded = torch.export.load(str(paths[-1]))
    x = torch.tensor([[3, 1, 2]]), torch.randn(1, 4)  # the export fixed feats to one row
    assert torch.equal(loaded.module()(*x), ep.module()(*x))
