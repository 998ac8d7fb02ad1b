"""The server on the real model: tools/bench_serve.py with SmolLM2-135M-Instruct and the shipped
n = 2 draft (schedule.name=spd), one MT-Bench prompt; the streamed greedy answer through the
server equals examples/decode.py's. Slow (two torchrun starts of the real model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_server_answer_equals_decode_py_with_the_shipped_draft(tmp_path):
    out = tmp_path / "bench_serve.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_serve.py"), "--prompts", "1", "--max-tokens", "16",
           "--timeout", "400", "--out", str(out), "schedule.name=spd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_text"] and row["tokens"] >= 1, row
    assert row["server_ttft_s"] > 0 and row["server_tokens_per_s"] > 0
