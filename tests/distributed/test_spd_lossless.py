"""Lossless greedy SPD: token for token equal to the autoregressive schedule (fp32, tiny target).

Drafts: an oracle (always right: every cycle accepts, tokens/cycle reaches 1), an adversary
(always wrong: every verification rejects, tokens/cycle = 1/n) and a random one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.draft import AdversarialDraft, OracleDraft, RandomDraft
from spd_megatron.engine import build_engine, build_schedule
from spd_megatron.parallel.init import init_parallel
from spd_megatron.schedule.spd import SPDSchedule

NEW = 24


def make_draft(kind, reference, vocab):
    return {"oracle": lambda: OracleDraft(reference, vocab),
            "adversarial": lambda: AdversarialDraft(reference, vocab),
            "random": lambda: RandomDraft(vocab, seed=1)}[kind]()


def _worker(rank, world_size, ckpt, tp, split, kinds):
    cfg = tiny_config(ckpt, tp=tp, split=split)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = engine.schedule.generate(prompt, NEW)
    n = engine.ctx.pp_size
    for kind in kinds:
        if kind == "pdm":  # a randomly initialised PDM with anchors from every stage
            cfg.schedule.name, cfg.draft.num_layers = "spd", 2
            spd = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
        else:
            draft = make_draft(kind, prompt + ref.output_ids, engine.arch.vocab_size) \
                if engine.stage.placement.is_first else None
            spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=draft)
        spd.prefill_chunk_size = 4
        got = spd.generate(prompt, NEW)
        again = [spd.generate(prompt, NEW) for _ in range(2)] if kind == "pdm" else []
        if not engine.stage.placement.is_first:
            continue
        for repeat in again:  # timers are per sequence: the draft's share never exceeds the decode time
            assert repeat.output_ids == ref.output_ids
            assert 0 < repeat.stats.draft_seconds <= repeat.stats.decode_seconds
        assert got.output_ids == ref.output_ids, (kind, got.output_ids, ref.output_ids)
        s = got.stats
        assert s.verified == NEW - 1 == s.accepted + s.rollbacks  # every decode token had a verdict
        if kind == "oracle":
            assert s.accepted == s.verified == NEW - 1 and s.rollbacks == 0
            assert s.cycles == NEW - 1 + (n - 1)  # warm-up n-1 cycles, then one token per cycle
        if kind == "adversarial":
            assert s.accepted == 0 and s.rollbacks == s.verified == NEW - 1
            assert s.cycles == (NEW - 1) * n  # every token costs a full refill: 1/n per cycle
            assert s.tokens_per_cycle == pytest.approx(1 / n, rel=1e-9)


CASES = [  # world, tp, explicit split
    pytest.param(2, 1, (), id="pp2"),
    pytest.param(3, 1, (), id="pp3"),
    pytest.param(4, 1, (1, 1, 1, 1), id="pp4"),
    pytest.param(4, 2, (3, 1), id="tp2-pp2-uneven"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("world,tp,split", CASES)
def test_spd_greedy_equals_autoregressive(tiny_models, world, tp, split):
    run_distributed(_worker, world, tiny_models["llama"][1], tp, split,
                    ("oracle", "adversarial", "random", "pdm"), timeout_s=240)
