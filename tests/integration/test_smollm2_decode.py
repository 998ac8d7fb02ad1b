"""The main job on the real model: examples/decode.py under torchrun equals HF greedy generate.

Slow: converts SmolLM2-135M-Instruct into the cache on first use (~40 s), then two torchrun runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spd_megatron.convert.builtin import builtin_hf_folder, ensure_builtin_checkpoint

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 32


def run_decode(nproc: int, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           str(ROOT / "examples" / "decode.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def smollm2():
    return ensure_builtin_checkpoint("smollm2-135m-instruct", "float32"), builtin_hf_folder("smollm2-135m-instruct")


@pytest.mark.slow
def test_decode_pp2_equals_hf_generate(smollm2, tmp_path):
    ckpt, hf_dir = smollm2
    report = tmp_path / "report.json"
    proc = run_decode(2, "prompts_file=mt_bench", "prompts_limit=3", f"max_new_tokens={NEW_TOKENS}",
                      "schedule.name=autoregressive", f"report.json={report}", "report.stream=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(report.read_text())["results"]
    assert len(results) == 3

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    for r in results:
        ids = torch.tensor([r["prompt_ids"]])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        assert r["output_ids"] == expected.tolist(), r["prompt"][:60]
        assert r["stats"]["new_tokens"] == len(r["output_ids"]) and r["stats"]["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(smollm2, tmp_path):
    outs = []
    for i in range(2):
        report = tmp_path / f"r{i}.json"
        proc = run_decode(1, "prompt=Tell me a story.", "max_new_tokens=12", "sampling.temperature=0.8",
                          "sampling.top_k=40", "sampling.seed=3", f"report.json={report}", "report.stream=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(report.read_text())["results"][0]["output_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 12


@pytest.mark.slow
def test_spd_pp2_equals_hf_generate(smollm2, tmp_path):
    """SPD (random PDM on stage 0: many rejects and rollbacks) on the real model is lossless."""
    ckpt, hf_dir = smollm2
    report = tmp_path / "spd.json"
    proc = run_decode(2, "prompts_file=humaneval", "prompts_limit=2", "max_new_tokens=24",
                      "schedule.name=spd", f"report.json={report}", "report.stream=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    for r in data["results"]:
        ids = torch.tensor([r["prompt_ids"]])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        assert r["output_ids"] == expected.tolist()
        stats = r["stats"]
        assert stats["verified"] == len(r["output_ids"]) - 1 and stats["pipeline_depth"] == 2
        assert stats["verified"] == stats["accepted"] + stats["rollbacks"]
    assert "acceptance_rate" in data["summary"] and "equivalent_accept_length" in data["summary"]
