"""lower_to_xnnpack(cache_views=True): the K/V caches reach attention as zero-copy views.

The tiny Gemma (2 layers, one sliding) is lowered twice (one ``prefill`` method, which also runs
the decode steps, as the builder exports it), as the builder lowers it and with ``cache_views``; both programs run the same prefill chunks and decode steps (past the ring
size) and must give the same logits to the bit. Without the memory-planning fix of
:mod:`fxport.lowering.cache_views` the views of the reinplaced cache writes point at storage
that is never planned (NaN logits on the 270M), so the equality is the test of that fix too.
"""

from __future__ import annotations

import pytest
import torch

from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import sliding_window_buffers
from fxport.runtime.pte_backend import PteBackend
from fxport.tests.lowering.helpers import lower_fast

CACHES = 4  # 2 layers x (k, v)


@pytest.fixture(scope="module")
def lowered(tiny, tmp_path_factory):
    model = tiny.model()
    out = {}
    for name, views in (("copies", False), ("views", True)):  # lowering consumes its programs
        with torch.no_grad():
            programs = export_methods(model, max_prefill_chunk=tiny.max_chunk, methods=("prefill",))
        programs, _ = apply_method_passes(programs, cpu_passes(windows=sliding_window_buffers(model), custom_sdpa=False))
        low = lower_fast(programs, constant_methods=tiny.metadata(), cache_views=views)
        out[name] = (low, low.save(tmp_path_factory.mktemp(name) / f"{name}.pte"))
    return out


def _kernel_calls(low, method: str, name: str) -> int:
    """Portable kernel calls of operator ``name`` (e.g. ``aten::view_copy``) in ``method``'s plan."""
    plan = next(p for p in low.executorch_program.execution_plan if p.name == method)
    ids = {i for i, op in enumerate(plan.operators) if op.name == name}
    return sum(1 for chain in plan.chains for ins in chain.instructions
               if type(ins.instr_args).__name__ == "KernelCall" and ins.instr_args.op_index in ids)


def test_cache_views_leave_the_delegates(lowered):
    """Each cache's view (K and V of both layers) leaves XNNPACK, per method, and runs as no
    instruction at all (a static view is planned as an alias of the cache: no copy kernel); the
    delegate count is unchanged (the views were at the delegates' input boundary)."""
    copies, views = lowered["copies"][0], lowered["views"][0]
    assert copies.methods == views.methods == ["prefill"]
    for method in copies.methods:
        assert copies.report[method].undelegated_ops["aten.view_copy"] == 0
        assert views.report[method].undelegated_ops["aten.view_copy"] == CACHES
        assert _kernel_calls(views, method, "aten::view_copy") == 0
        assert views.report[method].delegates == copies.report[method].delegates


def test_cache_views_same_logits_to_the_bit(lowered, tiny):
    """Prefill chunks, then decode steps past the ring size (8): logits equal (torch.equal)."""
    torch.manual_seed(3)
    tokens = torch.randint(0, tiny.config().vocab_size, (1, 15))
    runs = {}
    for name, (_, path) in lowered.items():
        backend, outs, pos = PteBackend(path), [], 0
        for n in (5, 4):
            outs.append(backend.prefill(tokens[:, pos:pos + n], torch.arange(pos, pos + n))[:, -1])
            pos += n
        for p in range(pos, tokens.shape[1]):
            outs.append(backend.decode(tokens[:, p:p + 1], torch.tensor([p]))[:, -1])
        runs[name] = torch.cat(outs)
    assert runs["views"].shape == (8, tiny.config().vocab_size)
    assert torch.isfinite(runs["views"]).all()
    assert torch.equal(runs["views"], runs["copies"])
