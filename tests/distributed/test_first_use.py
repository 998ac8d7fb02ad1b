"""First use of the builtin model: the cached conversion is complete whichever rank makes it.

The GGUF loader is replaced by a tiny HF model (fast); everything after it, the HF folder, the
checkpoint, the file locks and the process groups, is the real path. transformers'
``save_pretrained`` writes nothing on a non-zero rank once torch.distributed is initialised, which
once left a cache folder without config.json when rank 1 won the lock (issue 11).
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest
import torch
from multiproc import run_distributed
from tiny_models import make_tiny_hf

from spd_megatron.convert import sources
from spd_megatron.convert.builtin import ensure_builtin_checkpoint

NAME = "smollm2-135m-instruct"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Make the builtin 'GGUF' load a tiny llama (and its tokenizer) instead of dequantising."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = make_tiny_hf("llama_tied", tmp_path / "tiny-hf")

    def load(source):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(hf_dir)

    monkeypatch.setattr(sources, "_load_gguf_model", load)
    return hf_dir


def _wait_until_locked(lock: Path, timeout_s: float) -> None:
    """Return once another process holds ``lock`` (an flock), so this one comes second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lock.is_file():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    return
        time.sleep(0.01)
    raise TimeoutError(f"nobody took {lock} within {timeout_s} s")


def _rank1_converts(rank, world_size, cache):
    if rank == 0:
        _wait_until_locked(Path(cache) / f".hf-{NAME}.lock", timeout_s=60)
    ckpt = ensure_builtin_checkpoint(NAME, "float32", cache)
    assert (ckpt / "spd_checkpoint.json").is_file()


@pytest.mark.distributed
def test_rank1_converting_under_process_groups_writes_every_file(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    run_distributed(_rank1_converts, 2, str(cache), timeout_s=180)
    hf = cache / "hf" / NAME
    assert [name for name in HF_FILES if not (hf / name).is_file()] == []
    sources.resolve_source(hf)
    ckpt = cache / "checkpoints" / f"{NAME}-float32"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    leftovers = [p.name for p in (cache / "hf").iterdir()] + [p.name for p in (cache / "checkpoints").iterdir()]
    assert sorted(leftovers) == [NAME, f"{NAME}-float32"]  # no temporary folder left behind


def _rebuild(rank, world_size, cache):
    ensure_builtin_checkpoint(NAME, "float32", cache)


@pytest.mark.distributed
def test_an_incomplete_cache_is_rebuilt(fake_gguf, tmp_path, capfd):
    """What an older version or a killed run left: a tokenizer-only HF folder, a record without
    weights, temporary folders. The next run rebuilds them instead of failing. (In a forked
    process, like every conversion here: the pytest process itself computes nothing.)"""
    cache = tmp_path / "cache"
    hf = cache / "hf" / NAME
    hf.mkdir(parents=True)
    (hf / "tokenizer.json").write_text("{}")
    (cache / "hf" / f".{NAME}.tmp-killed").mkdir()
    old_ckpt = cache / "checkpoints" / f"{NAME}-float32"
    old_ckpt.mkdir(parents=True)
    (old_ckpt / "spd_checkpoint.json").write_text('{"format_version": 1}')
    run_distributed(_rebuild, 1, str(cache), timeout_s=180)
    sources.check_hf_folder(hf)
    assert (old_ckpt / "model.safetensors").is_file()
    assert sorted(p.name for p in (cache / "hf").iterdir()) == [NAME]
    err = capfd.readouterr().err
    assert err.index("first use: converting") < err.index("ready in")
