"""``fxport export`` through fxport.builder: the stage table it prints, and the CUDA dry run of a
preset on the meta device (no --out, no weights)."""

from __future__ import annotations

from fxport.cli import main


def test_plain_export_leaves_no_reuse_manifest(tiny_pte):
    """Only ``fxport demo`` (build(..., reuse=True)) records a manifest; a plain export must not
    leave one that could vouch for a file it did not check."""
    from fxport.builder import manifest_path

    assert tiny_pte.is_file() and not manifest_path(tiny_pte).exists()


def test_cuda_dry_run_of_a_preset_on_the_meta_device(capsys):
    argv = ["export", "--preset", "tiny-gemma3", "--layers", "1", "--backend", "cuda", "--dry-run",
            "--max-seq-len", "16", "--max-prefill-chunk", "5", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[prefill] 01 ring_buffer_kv_cache: changed=True")  # pass stats first
    assert "CUDA dry run (partition only; AOTInductor compilation needs a GPU)" in out
    assert "result: every node delegated" in out
    table = out[out.index(next(line for line in out if line.startswith("stage times (load average "))):]
    assert [row.split()[0] for row in table[2:]] == ["load", "export", "passes", "lower", "total"]
