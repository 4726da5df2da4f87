"""The GPU check's CPU smoke (``bench/gpu_check.py --smoke``) runs every stage's code path.

Run in a subprocess (``TRITON_INTERPRET=1`` must precede the triton import, and the smoke blocks
torchao / executorch imports, as on the GPU machine). Asserts the table it writes: a row per
stage, and ok rows for split-K decode, the int4 GEMV and the model decode, so a stage that
breaks fails CI instead of rotting until the next GPU run. Its figures are not measurements.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_table(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu-check.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| \d\. ", line)]
    assert all(len(r) == 5 for r in rows), rows
    by_stage: dict[str, list[tuple[str, str]]] = {}
    for stage, figure, _goal, status, _secs in rows:
        by_stage.setdefault(stage.lstrip("| ").split(".")[0], []).append((figure, status))
    assert sorted(by_stage) == ["1", "2", "3", "4", "5", "6", "7"], text
    for stage in ("1", "2", "3", "4", "5", "7"):  # every row of the code-path stages ran and passed
        assert all(status == "ok" for _, status in by_stage[stage]), (stage, by_stage[stage])
    assert any(f.startswith("31b-like global") and "split-K" in f for f, _ in by_stage["2"])
    assert any(f.startswith("GEMV M=1") for f, _ in by_stage["4"])
    assert any("tok/s" in f and "sdpa_decode_splitk" in f for f, _ in by_stage["5"])
    assert by_stage["6"] == [("skipped: executorch not installed", "skipped")]
    assert all("CPU smoke, not a measurement" in f for s in "123457" for f, _ in by_stage[s])
    # stage 7: the CLI's CUDA export refused without a GPU, then the AOTInductor fallback's code path
    (export, _), (generation, _) = by_stage["7"]
    assert export.startswith("`fxport export --preset tiny --backend cuda --quant int4 ") and "exit 2" in export
    assert generation.startswith("generation through the rewritten decode program run eagerly")
    assert "greedy tokens equal the eager model's: yes" in generation
