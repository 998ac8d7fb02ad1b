"""tools/bench_gpu.py --smoke on CPU: the GPU benchmark's logic (model, worker, tables) before a
GPU session spends device time on it. Speed numbers are not checked, only that every row ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_smoke_runs_every_cpu_row(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    decode = result["decode"]
    assert set(decode) == {"ar_eager", "spd_oracle_eager", "spd_pdm_eager"}, decode
    assert all(row["same_output_as_ar"] for row in decode.values())
    assert decode["spd_oracle_eager"]["acceptance_rate"] == 1.0  # the oracle is always right
    assert result["steps"]["local_eager"]["ms_per_step"] > 0
    assert result["pdm"]["pdm_eager"]["ms_per_step"] > 0
