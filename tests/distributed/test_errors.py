"""Bad input ends every rank with one clear line: never a hang, never a raw megatron traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_config
from multiproc import run_distributed
from tiny_models import make_tiny_hf

from spd_megatron.convert.pipeline import convert_hf_to_checkpoint
from spd_megatron.errors import SPDError
from spd_megatron.parallel.link import StageLink, report_failure
from spd_megatron.runner import run_decode

ROOT = Path(__file__).resolve().parents[2]


def _expect_error(rank, world_size, cfg, pattern):
    with pytest.raises(SPDError, match=pattern) as err:
        run_decode(cfg)
    assert "\n" not in str(err.value)


def check(world, cfg, pattern):
    run_distributed(_expect_error, world, cfg, pattern, timeout_s=120)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A 1-layer model (for PP > layers) and one with 3 KV heads (TP=2 does not divide it)."""
    root = tmp_path_factory.mktemp("odd")
    one = convert_hf_to_checkpoint(make_tiny_hf("llama", root / "one-hf", num_hidden_layers=1),
                                   root / "one", show_progress=False)
    three = convert_hf_to_checkpoint(
        make_tiny_hf("llama", root / "kv3-hf", hidden_size=96, num_attention_heads=6, num_key_value_heads=3),
        root / "kv3", show_progress=False)
    return {"one_layer": one, "kv3": three}


@pytest.mark.distributed
def test_missing_checkpoint(tmp_path):
    check(1, tiny_config(tmp_path / "nope"), "does not exist")


@pytest.mark.distributed
def test_hf_folder_given_as_checkpoint(tiny_models):
    check(1, tiny_config(tiny_models["llama"][0]), "convert it with tools/convert_hf.py")


@pytest.mark.distributed
def test_tp_not_dividing_query_groups(odd_models):
    check(2, tiny_config(odd_models["kv3"], tp=2), "does not divide num_query_groups=3")


@pytest.mark.distributed
def test_pp_larger_than_layers(odd_models):
    check(2, tiny_config(odd_models["one_layer"], pp=2), "larger than the model's 1 layers")


@pytest.mark.distributed
def test_dtype_mismatch(tiny_models):
    check(1, tiny_config(tiny_models["llama"][1], model__dtype="bfloat16"), "stores float32 weights")


@pytest.mark.distributed
def test_process_count_mismatch(tiny_models):
    check(2, tiny_config(tiny_models["llama"][1], tp=2, pp=2), "needs 4 processes but 2 were launched")


@pytest.mark.distributed
def test_prompt_longer_than_cache(tiny_models):
    cfg = tiny_config(tiny_models["llama"][1], pp=2, prompt="x" * 200, model__max_seq_len=64)
    check(2, cfg, "does not fit the KV cache of 64")


@pytest.mark.distributed
def test_malformed_prompts_file(tiny_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"turns": ["fine"]}\n{not json\n')
    check(1, tiny_config(tiny_models["llama"][1], prompts_file=str(bad)), r"bad.jsonl:3: not valid JSON")


@pytest.mark.distributed
def test_checkpoint_of_another_model(tiny_models, tmp_path):
    """The record says one architecture, the weights are another's: named tensor, one line."""
    ckpt = shutil.copytree(tiny_models["qwen3"][1], tmp_path / "mixed")
    other = json.loads((tiny_models["llama"][1] / "spd_checkpoint.json").read_text())
    record = json.loads((ckpt / "spd_checkpoint.json").read_text())
    record["arch"] = other["arch"]
    (ckpt / "spd_checkpoint.json").write_text(json.dumps(record))
    check(1, tiny_config(ckpt), r"checkpoint tensor decoder\.layers\.0\.\S+ gives shape .* the checkpoint does not match")


def _one_rank_fails(rank, world_size):
    """Rank 1 fails; rank 0 waits on it and must end with rank 1's message, not hang."""
    if rank == 1:
        report_failure(1, "boom: bad things on rank 1")
        raise SystemExit(3)
    import torch

    link = StageLink(0, prev_rank=1, next_rank=None, first_rank=0, last_rank=1, hidden_size=8,
                     dtype=torch.float32, timeout_s=20)
    start = time.monotonic()
    with pytest.raises(SPDError, match="rank 1: boom: bad things on rank 1"):
        link.recv_prev()
    assert time.monotonic() - start < 19, "rank 0 should learn of the failure before its timeout"


@pytest.mark.distributed
def test_failure_on_one_rank_ends_all_with_its_message():
    with pytest.raises(AssertionError, match=r"exit codes \[0, 1\](.|\n)*SystemExit: 3"):
        run_distributed(_one_rank_fails, 2, timeout_s=60)


def _peer_silent(rank, world_size):
    import torch

    if rank == 0:
        link = StageLink(0, prev_rank=1, next_rank=None, first_rank=0, last_rank=1, hidden_size=8,
                         dtype=torch.float32, timeout_s=2)
        with pytest.raises(SPDError, match="rank 0: no header from rank 1 within 2 s"):
            link.recv_prev()
    else:
        time.sleep(4)


@pytest.mark.distributed
def test_receive_times_out_with_a_clear_message():
    run_distributed(_peer_silent, 2, timeout_s=60)


def _peer_dies(rank, world_size):
    import torch

    if rank == 0:
        link = StageLink(0, prev_rank=1, next_rank=None, first_rank=0, last_rank=1, hidden_size=8,
                         dtype=torch.float32, timeout_s=30)
        start = time.monotonic()
        with pytest.raises(SPDError, match=r"rank 0: no header from rank 1 after [0-9.]+ s: the connection failed"):
            link.recv_prev()
        assert time.monotonic() - start < 25, "a dead peer is reported as it happens, not at the timeout"
    else:
        time.sleep(1)
        os._exit(0)  # dies without a word (as after a kill)


@pytest.mark.distributed
def test_a_dead_peer_is_named_at_once_not_as_a_timeout():
    run_distributed(_peer_dies, 2, timeout_s=60)


def test_cli_error_is_one_line_on_every_rank(tiny_models):
    """The real launcher: torchrun with the wrong process count exits non-zero, quickly, one line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(ROOT / "examples" / "decode.py"), "--config", "tiny",
           f"model.checkpoint={tiny_models['llama'][1]}", "parallel.tensor_parallel_size=2",
           "parallel.pipeline_parallel_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # every rank hits the same check; torchrun may SIGTERM the slower rank before it prints
    assert 1 <= len(errors) <= 2, proc.stderr[-2000:]
    assert all("needs 4 processes but 2 were launched" in line for line in errors)
    # torchrun prints its own ChildFailedError summary; no frame of ours or megatron's may show
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "megatron/" in f], frames


def _print_error(rank, world_size, failing):
    from spd_megatron.runner import print_error_once

    if rank in failing:
        print_error_once(rank, f"boom on rank {rank}")
    if rank == 0:
        time.sleep(1.0)  # rank 0 hosts the store here; under torchrun the agent does, and outlives it


@pytest.mark.distributed
def test_an_error_every_rank_hits_is_printed_once(capfd, monkeypatch):
    """Rank 0 prints it; rank 1 sees that and stays quiet. Failing alone, rank 1 prints its own."""
    import spd_megatron.runner as runner

    monkeypatch.setattr(runner, "ERROR_GRACE_S", 2.0)
    run_distributed(_print_error, 2, (0, 1), timeout_s=60)
    err = capfd.readouterr().err
    assert err.count("error: boom on rank") == 1 and "error: boom on rank 0" in err, err
    run_distributed(_print_error, 2, (1,), timeout_s=60)
    err = capfd.readouterr().err
    assert err.count("error: boom on rank") == 1 and "error: boom on rank 1" in err, err
