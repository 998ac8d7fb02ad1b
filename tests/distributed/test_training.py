"""PDM training: the block-layout forward equals inference, a few steps learn, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from multiproc import run_distributed
from tiny_models import byte_tokenizer

from spd_megatron.config import ParallelConfig
from spd_megatron.convert.checkpoint import read_arch
from spd_megatron.draft.base import DraftContext, DraftRow
from spd_megatron.draft.pdm import PDMConfig, PDMDraft, PipelineDraftModule, init_from_target
from spd_megatron.draft.training.data import encode
from spd_megatron.draft.training.trainer import PDMTrainer, Teacher
from spd_megatron.engine import build_stage
from spd_megatron.parallel.init import init_parallel
from spd_megatron.sampling.logits import SamplingParams
from helpers import tiny_config

MESSAGES = [{"role": "user", "content": "count with me"},
            {"role": "assistant", "content": "one two three four five six seven"}]


def setup(ckpt, pdm_layers=1):
    cfg = tiny_config(ckpt)
    ctx = init_parallel(cfg.parallel)
    arch = read_arch(ckpt)
    teacher = Teacher(build_stage(cfg, ctx, ckpt, arch), [0, 2, 4])
    pdm_cfg = PDMConfig([2, 2], [0, 2, 4], pdm_layers, list(range(0, 260)), arch.to_dict())
    torch.manual_seed(0)
    module = PipelineDraftModule(pdm_cfg, arch, max_seq_len=96)
    with torch.no_grad():
        init_from_target(module, ckpt)
    return teacher, module


def _equivalence_worker(rank, world_size, ckpt):
    teacher, module = setup(ckpt)
    example = encode(byte_tokenizer(), MESSAGES, 40)
    batch = teacher.features(example)
    trainer = PDMTrainer(module, lr=1e-3, warmup=1, total_steps=10)
    module.eval()
    t = 30
    for fill in (2, 1):
        with torch.no_grad():
            train_logits = trainer.forward(batch, fill)[t]  # [V_d]
        draft = PDMDraft(module)
        complete_until = t - fill + 1  # positions below are complete (deepest rows)
        rows = [DraftRow(p, example.ids[p], 2, {k: batch.anchors[k][p] for k in (0, 2, 4)})
                for p in range(complete_until)]
        live = [DraftRow(p, example.ids[p], t - p, {k: batch.anchors[k][p] for k in (0, 2, 4)})
                for p in range(complete_until, t + 1)]
        with torch.inference_mode():
            draft.start(rows)
            hidden = draft._run(live, keep=0)
            infer_logits = module.logits(hidden[-1, 0])
        torch.testing.assert_close(train_logits, infer_logits, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, fill=fill: f"fill {fill}: {m}")


@pytest.mark.distributed
def test_training_forward_equals_inference_for_the_newest_row(tiny_models):
    run_distributed(_equivalence_worker, 1, tiny_models["llama"][1], timeout_s=120)


def _learn_worker(rank, world_size, ckpt):
    teacher, module = setup(ckpt)
    batch = teacher.features(encode(byte_tokenizer(), MESSAGES, 48))
    trainer = PDMTrainer(module, lr=3e-3, warmup=1, total_steps=40)
    before = trainer.evaluate([batch])["kl"]
    for _ in range(12):
        trainer.train_step(batch)
    for _ in range(13):  # accumulated steps: two conversations per optimizer step
        _, _, count = trainer.train_step([batch, batch])
        assert count == 2 * int(trainer.valid(batch).sum()) > 0
    after = trainer.evaluate([batch])["kl"]
    assert after < 0.7 * before, (before, after)


@pytest.mark.distributed
def test_a_few_steps_reduce_the_loss(tiny_models):
    run_distributed(_learn_worker, 1, tiny_models["llama"][1], timeout_s=120)


def _resume_worker(rank, world_size, ckpt, out):
    from pathlib import Path

    batches = None
    results = []
    for interrupted in (False, True):
        teacher, module = setup(ckpt)
        batches = batches or [teacher.features(encode(byte_tokenizer(), MESSAGES, 40 + 4 * i)) for i in range(3)]
        trainer = PDMTrainer(module, lr=2e-3, warmup=2, total_steps=6, seed=1)
        for step in range(6):
            if interrupted and step == 3:
                trainer.save(Path(out) / "latest", {})
                teacher, module = setup(ckpt)  # a fresh process, as after a crash
                trainer = PDMTrainer(module, lr=2e-3, warmup=2, total_steps=6, seed=1)
                trainer.load(Path(out) / "latest")
                assert trainer.step == 3
            trainer.train_step(batches[step % 3])
        results.append({k: v.clone() for k, v in module.state_dict().items() if not k.endswith("_extra_state")})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.distributed
def test_resume_continues_exactly(tiny_models, tmp_path):
    run_distributed(_resume_worker, 1, tiny_models["llama"][1], str(tmp_path), timeout_s=180)
