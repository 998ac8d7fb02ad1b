"""tools/bench_p2p.py: every mode (on-demand and pre-posted StageLink, raw send/recv) completes its
round trips on two gloo ranks and lands in the JSON; timings are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_p2p_runs_every_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_p2p.py"), "--iters", "20", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "bench_p2p.json").read_text())["summary"]
    assert list(summary) == ["stagelink_sym", "stagelink_ring", "stagelink_prepost", "raw_send_recv"]
    assert all(s["n"] == 20 and s["one_way_us_median"] > 0 for s in summary.values())
