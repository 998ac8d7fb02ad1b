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
        scale = float(a(ids).logits.abs().max())  # --verify's difference, relative to the logits' size
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


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


def test_folder_without_a_usable_tokenizer_is_one_line(tmp_path):
    """No tokenizer files: converts (a warning), and --verify ends in one line; a tokenizer_config.json
    without the files it needs: one line naming the folder and what to copy into it."""
    hf = make_tiny_hf("llama", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (hf / name).unlink(missing_ok=True)
    proc = convert("--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--verify")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: checkpoint ") and "has no tokenizer files" in last
    (hf / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    proc = convert("--hf", str(hf), "--out", str(tmp_path / "ckpt2"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: model folder {hf}: its tokenizer does not load") and "tokenizer.json" in last
