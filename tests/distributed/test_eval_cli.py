"""tools/eval.py end to end on a tiny model: the main run, baselines as subprocesses, summary and
plots; a failing baseline ends the run with one line; a rerun decodes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_eval(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "eval.py"), "--config", "tiny", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_eval_cli_with_baselines_failure_and_resume(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question_id": 1, "turns": ["hello there"]}\n{"question_id": 2, "turns": ["a b a b"]}\n')
    out = tmp_path / "eval"
    common = [f"model.checkpoint={tiny_models['llama'][1]}", f"prompts_file={prompts}", "max_new_tokens=6",
              f"eval.out={out}", "eval.threads=1"]
    proc = run_eval(*common, "eval.baselines=[ar_pp1,hf_generate]", "eval.hf_dir=/nonexistent/hf")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 baseline(s) failed: hf_generate"), proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"]["hf_generate"].startswith("hf_generate: failed (exit")
    assert set(summary["configs"]) == {"autoregressive", "ar_pp1"} and summary["main_run"]["decoded"] == 2
    assert summary["speedup"]["ar_pp1"]["same_output"] == 2  # the same schedule, in another process
    assert (out / "phase_breakdown.png").is_file()
    assert len((out / "ar_pp1.jsonl").read_text().splitlines()) == 2

    proc = run_eval(*common)  # resumed: both prompts were already measured
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["main_run"]["decoded"] == 0
    assert len((out / "autoregressive.jsonl").read_text().splitlines()) == 2
