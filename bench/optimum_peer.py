"""optimum-executorch's program for the Gemma 3 270M GGUF: the peer row of ``bench/e2e_cpu.py`` (issue 24).

Builds ``build/optimum/model.pte`` the way a user of Hugging Face's optimum-executorch 1.1.0 would:
XNNPACK recipe, 8-bit dynamic activation / 8-bit weight linears (``--qlinear 8da8w``), int8 embedding
(``--qembedding 8w``), ExecuTorch's ``llama::custom_sdpa`` and ``update_cache`` KV cache
(``--use_custom_sdpa --use_custom_kv_cache``), 512 positions (``--max_seq_len 512``, the window
``bench/quality.py`` scores and ``bench/e2e_cpu.py``'s fxport programs have).

There is no model hub here, so the checkpoint is made from the same GGUF every other row reads:

1. ``build/optimum/hf/``: transformers (the project's ``.venv``, transformers 5.23) loads the GGUF
   (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``, weights dequantized to float32)
   and ``save_pretrained``\\ s it with its tokenizer (``tokenizer.json``, which ExecuTorch's
   ``TextLLMRunner`` reads). transformers refuses to save a model it loaded "quantized with gguf";
   the weights it holds are plain float32, so the quantizer is dropped before saving.
2. ``optimum-cli export executorch`` from that directory, in its own virtualenv (optimum-executorch
   1.1.0 pins transformers 5.0.0rc1, the project pins 5.23): writes ``build/optimum/model.pte``
   (weights inside the program, no ``.ptd``).

The program's contract (what ``bench/e2e_cpu.py``'s optimum row reads): one method ``forward``
taking ``(input_ids (1, L) int64, cache_position (L,) int64)``, ``1 <= L <= 511``, returning
float32 logits ``(1, L, V)`` for every position; KV caches are mutable buffers inside it.

The virtualenv (once; torch first, so pip takes the CPU wheel on disk instead of a CUDA build)::

    python3.11 -m venv /work/oe-venv
    /work/oe-venv/bin/pip install torch==2.13.0
    /work/oe-venv/bin/pip install executorch==1.5.1 'torchao>=0.18,<0.19' transformers==5.23.0 gguf
    /work/oe-venv/bin/pip install optimum-executorch==1.1.0   # brings optimum 2.0.0, transformers 5.0.0rc1

The command (prints the export wall time and the file size; ``--force`` rebuilds both steps)::

    nice .venv/bin/python bench/optimum_peer.py --venv /work/oe-venv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "optimum"
HF_DIR = OUT / "hf"
PTE = OUT / "model.pte"
MAX_SEQ_LEN = 512

EXPORT_ARGS = ["export", "executorch", "--task", "text-generation", "--recipe", "xnnpack",
               "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da8w", "--qembedding", "8w",
               "--max_seq_len", str(MAX_SEQ_LEN)]


def prepare_hf(gguf: Path, out: Path = HF_DIR, force: bool = False) -> Path:
    """``out``: a Hugging Face checkpoint (config, float32 safetensors, tokenizer.json) of ``gguf``,
    written into a temporary directory renamed into place (never a half-written checkpoint)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() \
            and (out / "tokenizer.json").is_file() and not force:
        return out
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantized float32: nothing of the GGUF's format is left
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def export(venv: Path, hf_dir: Path = HF_DIR, out_dir: Path = OUT) -> tuple[Path, float]:
    """Run optimum-executorch's export of ``hf_dir`` in ``venv``; (``out_dir/model.pte``, wall s).
    Its log goes to ``out_dir/export.log``; a failure raises SystemExit with the log's last lines."""
    cli = venv / "bin" / "optimum-cli"
    if not cli.is_file():
        raise SystemExit(f"no optimum-cli in {venv}: make the virtualenv first (see bench/optimum_peer.py's docstring)")
    tmp = out_dir / "export.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.pte").unlink(missing_ok=True)
    cmd = [str(cli), *EXPORT_ARGS, "--model", str(hf_dir), "--output_dir", str(tmp)]
    log = out_dir / "export.log"
    print("running " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not (tmp / "model.pte").is_file():
        tail = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        raise SystemExit(f"optimum-executorch export failed (exit {rc}, {wall:.0f} s); {log}:\n" + "\n".join(tail))
    pte = out_dir / "model.pte"
    (tmp / "model.pte").replace(pte)
    if not any(tmp.iterdir()):
        tmp.rmdir()
    (out_dir / "export.json").write_text(json.dumps({"command": cmd, "wall_s": wall, "bytes": pte.stat().st_size}))
    return pte, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, required=True, help="the virtualenv with optimum-executorch 1.1.0")
    p.add_argument("--force", action="store_true", help="rebuild build/optimum/hf and the program")
    args = p.parse_args(argv)
    if PTE.is_file() and not args.force:
        info = json.loads((OUT / "export.json").read_text()) if (OUT / "export.json").is_file() else {}
        print(f"{PTE} exists ({PTE.stat().st_size / 1e6:.0f} MB, exported in {info.get('wall_s', float('nan')):.0f} s); "
              "--force rebuilds it")
        return 0
    from fxport.models.gemma4.load import gemma3_270m_gguf

    prepare_hf(gemma3_270m_gguf(), force=args.force)
    pte, wall = export(args.venv)
    print(f"optimum-executorch 1.1.0 export ({' '.join(EXPORT_ARGS[2:])}): {wall:.0f} s wall, "
          f"{pte} {pte.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
