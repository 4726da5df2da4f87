"""The eager backends of :func:`fxport.runtime.generate.generate`: an eager model and the
``export_methods`` program pair run through ``ep.module()``.

Below both :mod:`fxport.runtime.generate` (which re-exports them and builds them in
``as_backend``) and :mod:`fxport.runtime.speculative` (whose ``verifier`` runs an
:class:`EagerBackend`'s prefill as its verify call: the eager model returns every token's logits).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["EagerBackend", "ExportedBackend"]


class EagerBackend:
    """An eager model called as ``model(tokens, input_pos) -> logits (B, L, V)``.

    max_prefill_chunk: longest chunk per prefill call (default: the model's max_seq_len).
    """

    def __init__(self, model: torch.nn.Module, max_prefill_chunk: int | None = None):
        self.model = model.eval()
        self.max_seq_len = int(model.max_seq_len)
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.max_prefill_chunk = int(max_prefill_chunk or self.max_seq_len)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(tokens, input_pos)

    @torch.no_grad()
    def decode(self, token: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(token, input_pos)

    def reset(self) -> None:
        reset = getattr(self.model, "reset_caches", None)
        if reset is not None:
            reset()


def _set_tensor(module: torch.nn.Module, name: str, value: Tensor, kind: str) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    getattr(module, kind)[leaf] = value


class ExportedBackend:
    """The prefill / decode ``ExportedProgram`` pair of ``export_methods``, run eagerly.

    Each program's ``.module()`` gets its own copy of the state; the decode module's parameters
    and buffers are replaced by the prefill module's, so both read one set of weights and write
    one KV cache (buffer mutations are in-place ``copy_`` into those shared tensors).

    max_seq_len: default = dim 2 of the first ``*k_cache`` buffer (the full-length cache of
    ``export_methods``; pass it explicitly for programs whose caches are ring buffers).
    max_prefill_chunk: default = the upper bound of the prefill program's token dim.
    """

    def __init__(self, programs: Mapping[str, Any], max_seq_len: int | None = None,
                 max_prefill_chunk: int | None = None):
        missing = [m for m in ("prefill", "decode") if m not in programs]
        if missing:
            raise ValueError(f"ExportedBackend: programs has no {missing}; pass the dict "
                             "export_methods returns ({'prefill': ep, 'decode': ep}).")
        self.programs = dict(programs)
        self._prefill = programs["prefill"].module()
        self._decode = programs["decode"].module()
        shared = dict(self._prefill.named_parameters(remove_duplicate=False))
        for name, p in self._decode.named_parameters(remove_duplicate=False):
            if name in shared and shared[name].shape == p.shape:
                _set_tensor(self._decode, name, shared[name], "_parameters")
        bufs = dict(self._prefill.named_buffers(remove_duplicate=False))
        for name, b in self._decode.named_buffers(remove_duplicate=False):
            if name in bufs and bufs[name].shape == b.shape:
                _set_tensor(self._decode, name, bufs[name], "_buffers")
        if max_seq_len is None:
            caches = [b for n, b in bufs.items() if n.endswith("k_cache")]
            max_seq_len = int(caches[0].shape[2]) if caches else None
        self.max_seq_len = max_seq_len
        if max_prefill_chunk is None:
            max_prefill_chunk = self._upper_bound(programs["prefill"])
        self.max_prefill_chunk = int(max_prefill_chunk)
        embed = [p for n, p in shared.items() if n.endswith("embed_tokens.weight")]
        self.vocab_size = int(embed[0].shape[0]) if embed else None

    @staticmethod
    def _upper_bound(ep: Any) -> int:
        """Largest token length the prefill program accepts (its range constraint on L)."""
        tokens = next(n for n in ep.graph.nodes if n.op == "placeholder"
                      and n.name not in ep.graph_signature.inputs_to_parameters
                      and n.name not in ep.graph_signature.inputs_to_buffers
                      and n.name not in ep.graph_signature.inputs_to_lifted_tensor_constants)
        L = tokens.meta["val"].shape[-1]
        if isinstance(L, int):
            return L
        upper = ep.range_constraints[L.node.expr].upper
        return int(upper)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self._prefill(tokens, input_pos)

    @torch.no_grad()
    def decode(self, token: Tensor, input_pos: Tensor) -> Tensor:
        return self._decode(token, input_pos)
