"""The Gemma 4 MTP drafter as a :class:`fxport.runtime.speculative.Drafter`, over an eager target.

    drafter = MtpDrafter(target, assistant, k=4)      # target: fxport's eager Gemma4ForCausalLM
    generate(target, tokenizer, prompt, n, speculative=drafter)

A drafting round, as transformers' ``SinglePositionMultiTokenCandidateGenerator`` runs it: the
context's last token ``t`` (emitted, not yet fed to the target) sits at position ``p``; the target's
last call left its final hidden states (after ``model.norm``: transformers' ``hidden_states[-1]``)
and its KV caches. Step 1 feeds the drafter ``cat(target's scaled embedding of t, target's hidden
state at position p - 1)``; each next step feeds the drafted token's embedding and the drafter's
own projected state, at the same ``position_ids = p``. The shared K / V are those of the target's
last sliding layer and last full layer that own a cache (the "store" layers of a KV-sharing
target): the full one's positions ``0 .. p - 1``, the sliding one's last ``window`` positions
before ``p`` (transformers passes its sliding cache's states, whose length depends on its cache
class; the drafter's flipped window mask sees the last ``window + 1`` of them).

Drafts are the drafter's argmax (``Draft.probs`` None: a deterministic drafter, so rejection
sampling at temperature > 0 stays exact with ``q = one-hot``).

Only an eager target for now: a ``.pte`` program returns logits only (no hidden states) and its
caches live inside the runtime, so a ``draft`` method in the program (reading the target's KV
buffers by name and a hidden-state buffer the target's methods would write) is the next step.
Rejected positions need nothing here: the drafter reads positions before ``p`` only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fxport.models.gemma4.config import FULL, SLIDING

from .speculative import Draft

__all__ = ["MtpDrafter"]


class MtpDrafter:
    """Draft ``k`` tokens per round with a :class:`~fxport.models.gemma4.assistant.Gemma4AssistantForCausalLM`.

    target: fxport's eager ``Gemma4ForCausalLM`` that :func:`fxport.runtime.generate.generate`
        runs (its hidden states are captured by a forward hook on ``model.norm``).
    assistant: the drafter; its ``backbone_hidden_size`` must be the target's hidden size.
    """

    adaptive = False

    def __init__(self, target: nn.Module, assistant: nn.Module, k: int = 4):
        if k < 1:
            raise ValueError(f"MtpDrafter: k={k} must be >= 1 (tokens drafted per verify call)")
        cfg = target.config
        if assistant.config.backbone_hidden_size != cfg.hidden_size:
            raise ValueError(f"MtpDrafter: the drafter was built for a target of hidden size "
                             f"{assistant.config.backbone_hidden_size}, this target has {cfg.hidden_size}; "
                             "use the drafter of this target's size (get_assistant_preset)")
        self.k, self.target, self.assistant = int(k), target, assistant.eval()
        self.window = int(cfg.sliding_window)
        self.kv_layers = {}  # layer type -> the last attention of that type owning a cache
        for layer in target.model.layers:
            attn = layer.self_attn
            if getattr(attn, "kv_source", None) is None:
                self.kv_layers[attn.layer_type] = attn
        self._hidden: Tensor | None = None  # (L, H) of the target's last call
        self._positions: Tensor | None = None
        self._hooks = [target.model.norm.register_forward_hook(self._capture),
                       target.model.register_forward_pre_hook(self._capture_positions)]

    def close(self) -> None:
        """Remove the hooks from the target."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _capture_positions(self, module, args) -> None:
        self._positions = args[1].detach().clone()  # (tokens, input_pos, ...)

    def _capture(self, module, args, out) -> None:
        self._hidden = out[0].detach()  # (L, H): batch 1

    def _kv(self, layer_type: str, p: int) -> tuple[Tensor, Tensor]:
        attn = self.kv_layers[layer_type]
        v = attn.v_cache
        k = attn.k_cache if attn.k_cache is not None else attn._keys_from_values(v)
        lo = max(0, p - self.window) if layer_type == SLIDING else 0
        return k[:, :, lo:p], v[:, :, lo:p]

    @torch.no_grad()
    def propose(self, context: Sequence[int], k: int) -> Draft:
        p = len(context) - 1  # the last token's position (not yet fed)
        if self._hidden is None or p < 1 or k < 1:
            return Draft([])
        prev = (self._positions == p - 1).nonzero()
        if prev.numel() == 0:  # the target's last call did not process position p - 1
            return Draft([])
        h = self._hidden[int(prev[0, 0])][None, None]  # (1, 1, H)
        kv = {t: self._kv(t, p) for t in (SLIDING, FULL) if t in self.kv_layers}
        embed = self.target.model.embed_tokens
        pos = torch.tensor([[p]])
        token, out = int(context[-1]), []
        for _ in range(k):
            e = embed(torch.tensor([[token]]))  # (1, 1, H), scaled as the target embeds
            logits, h = self.assistant(torch.cat([e, h.to(e.dtype)], dim=-1), pos, kv)
            token = int(torch.argmax(logits[0, -1]))
            out.append(token)
        return Draft(out)
