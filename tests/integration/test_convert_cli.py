"""tools/convert_hf.py as a user runs it: HF -> checkpoint (--verify) -> HF, bit-exact round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_convert_verify_and_back(tmp_path):
    hf = make_tiny_hf("qwen2", tmp_path / "hf")  # tied embeddings and qkv bias
    proc = convert("--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--verify")
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = float(proc.stdout.split("max |logits(megatron) - logits(HF)| = ")[1].split()[0])
    assert diff < 1e-4
    proc = convert("--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    original, back = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[257, 10, 20, 30, 258]])
    a = AutoModelForCausalLM.from_pretrained(hf).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_convert_errors_are_one_line(tmp_path):
    proc = convert("--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    proc = convert("--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    proc = convert("--hf", str(gpt2), "--out", str(tmp_path / "x"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: unsupported architecture 'GPT2LMHeadModel'")
