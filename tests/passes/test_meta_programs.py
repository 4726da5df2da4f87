"""The CPU pass set on a meta-device program (no weight values) rewrites the same sites as on
the real-valued program and creates its constants (RMSNorm's mean, rotate_half's rotation) with
the same names, shapes and dtypes, on the meta device. The CUDA pass set on meta is covered by
``tests/lowering/test_cuda_dryrun.py`` (the dry run's own path) and Int4Dispatch alone by
``tests/passes/test_int4_dispatch.py``.

The programs differ before any pass in one place (torch.export, not fxport): SDPA's output on the
meta device has the math kernel's contiguous strides, so the prefill's ``transpose.reshape`` of
it is a copy there; the test compares the passes' work, not that export detail.
"""

from __future__ import annotations

import torch

from fxport.models.gemma4.config import FULL, SLIDING, get_preset
from fxport.models.gemma4.export import export_methods
from fxport.models.gemma4.model import Gemma4ForCausalLM

MAX_SEQ_LEN, CHUNK = 16, 5


def _stats(results):
    return {m: [(r.name, r.changed, r.stats.matched, r.stats.rewritten, dict(r.stats.skipped)) for r in res.records]
            for m, res in results.items()}


def _tensors(programs):
    return {m: {name: (tuple(t.shape), t.dtype) for name, t in {**ep.state_dict, **ep.constants}.items()}
            for m, ep in programs.items()}


def test_cpu_pass_set_on_a_meta_program():
    from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
    from fxport.models.gemma4.model import sliding_window_buffers

    config = get_preset("tiny-gemma3").replace(num_hidden_layers=2, layer_types=[SLIDING, FULL])
    out = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = Gemma4ForCausalLM(config, max_seq_len=MAX_SEQ_LEN).eval()
        with torch.no_grad():
            programs = export_methods(model, max_prefill_chunk=CHUNK, methods=("prefill",))
        out[device] = apply_method_passes(programs, cpu_passes(windows=sliding_window_buffers(model), max_prefill_chunk=CHUNK))
    (real, real_res), (meta, meta_res) = out["cpu"], out["meta"]
    assert _stats(meta_res) == _stats(real_res)
    assert [r.name for r in meta_res["prefill"].records if r.changed] == [
        "ring_buffer_kv_cache", "gelu_tanh_as_sigmoid", "additive_attention_mask", "sdpa_as_matmul",
        "rms_norm_as_linear", "symbolic_view_as_inferred", "rotate_half_as_linear", "last_token_logits",
        "edge_decompositions"]
    assert _tensors(meta) == _tensors(real)
    tensors = [*meta["prefill"].state_dict.values(), *meta["prefill"].constants.values()]
    assert all(t.is_meta for t in tensors)
    created = [n for n in meta["prefill"].constants if n.startswith(("fxport_rms_mean", "fxport_rotate_half"))]
    assert len(created) == 13 + 4  # one mean per RMSNorm site; one rotation per rotate_half site
