"""A tiny model that wanders, a small real tokenizer for its vocabulary, and ExecuTorch's stock runner in a fresh process.

:func:`tiny_tokenizer` builds, with the ``tokenizers`` library, a Gemma-style BPE (spaces as
"▁", byte-less, merges ranked by id) over exactly ``vocab_size`` ids with ``<pad>``, ``<eos>``,
``<bos>``, ``<unk>`` first, so a random-weight tiny model has a tokenizer both fxport and
ExecuTorch's C++ ``HFTokenizer`` read.

:func:`runner_in_fresh_process` runs :class:`fxport.runtime.stock_runner.StockRunner` in a new
Python process (nothing of the test process's registered kernels or loaded programs leaks in)
and returns its generations as JSON.
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

from tokenizers import AddedToken, decoders, normalizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from fxport.models.gemma4.config import FULL, SLIDING, get_preset
from fxport.models.gemma4.model import Gemma4ForCausalLM
from fxport.models.gemma4.tokenizer import SPIECE_SPACE, Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def varied_tiny_model(seed: int = 0, max_seq_len: int = 64, window: int = 4) -> Gemma4ForCausalLM:
    """A tiny Gemma 3-style model (2 sliding layers of ``window``, 1 global; untied head) whose
    random weights make greedy decoding wander (a tied head mostly repeats the input token)."""
    import torch

    torch.manual_seed(seed)
    cfg = get_preset("tiny-gemma3").replace(num_hidden_layers=3, layer_types=[SLIDING, SLIDING, FULL],
                                            tie_word_embeddings=False, sliding_window=window)
    model = Gemma4ForCausalLM(cfg, max_seq_len=max_seq_len).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if "norm" in name else 0.3)
    return model


def tiny_tokenizer(vocab_size: int = 256, bos_id: int = 2, eos_ids=(1,), specials=SPECIALS) -> Tokenizer:
    """A Gemma-style BPE tokenizer with exactly ``vocab_size`` ids (see the module docstring)."""
    base = [SPIECE_SPACE] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;")
    vocab = {t: i for i, t in enumerate(list(specials) + base)}
    merges = []
    # Merge pairs in a fixed order until the vocabulary is full: "▁a", "▁b", ..., "aa", "ab", ...
    pieces = [SPIECE_SPACE] + list(string.ascii_lowercase)
    for left in pieces:
        for right in string.ascii_lowercase:
            if len(vocab) >= vocab_size:
                break
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    assert len(vocab) == vocab_size, len(vocab)
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return Tokenizer(backend, bos_id, eos_ids, pad_id=0, add_bos=True)


_RUNNER_SCRIPT = r"""
import json, sys
from fxport.runtime.stock_runner import StockRunner, StockRunnerError
args = json.loads(sys.argv[1])
runner = StockRunner(args["pte"], args["tokenizer"], args.get("data"))
out = []
for prompt in args["prompts"]:
    try:
        g = runner.generate(prompt, args["max_new_tokens"], num_bos=args.get("num_bos", 1))
    except StockRunnerError as exc:
        out.append({"error": str(exc)})
        continue
    out.append({"text": g.text, "pieces": g.pieces, "prompt_tokens": g.prompt_tokens,
                "generated_tokens": g.generated_tokens})
print("RESULT " + json.dumps(out))
"""


def runner_in_fresh_process(pte: Path, tokenizer: Path, prompts: list[str], max_new_tokens: int,
                            data: Path | None = None, num_bos: int = 1) -> list[dict]:
    """ExecuTorch's ``TextLLMRunner`` (through :class:`StockRunner`) in a new process, one
    ``generate`` per prompt: ``[{"text", "pieces", "prompt_tokens", "generated_tokens"} or
    {"error": message}, ...]``."""
    args = {"pte": str(pte), "tokenizer": str(tokenizer), "prompts": prompts, "max_new_tokens": max_new_tokens,
            "num_bos": num_bos, **({"data": str(data)} if data is not None else {})}
    proc = subprocess.run([sys.executable, "-c", _RUNNER_SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"runner process failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])
