"""The worked example of a custom schedule: registered by name, lossless, hooks called."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.schedule import get_schedule_class

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_schedule.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_schedule", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(rank, world_size, ckpt):
    example = load_example()
    assert get_schedule_class("spd_lookup") is example.LookupSPDSchedule
    cfg = tiny_config(ckpt, pp=2)
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    prompt = ([65, 66, 67, 68] * 5)[:18]
    cfg.schedule.name = "spd_lookup"
    from spd_megatron.engine import build_schedule

    custom = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
    ref = engine.schedule.generate(prompt, 16).output_ids
    out = custom.generate(prompt, 16)
    if engine.stage.placement.is_first:
        assert out.output_ids == ref
        assert len(custom.verdicts) == out.stats.verified == 15
        assert custom.draft.calls == out.stats.cycles  # consulted once per cycle


@pytest.mark.distributed
def test_custom_schedule_example(tiny_models):
    run_distributed(_worker, 2, tiny_models["llama"][1], timeout_s=120)


def test_prompt_lookup_proposes_the_continuation_of_the_last_ngram():
    from spd_megatron.draft import DraftContext, OracleDraft
    from spd_megatron.sampling.logits import SamplingParams

    example = load_example()
    draft = example.PromptLookupDraft(OracleDraft([0] * 20, 260), ngram=2)
    tokens = [5, 6, 7, 8, 1, 2, 5, 6]
    proposal = draft.propose(DraftContext(len(tokens), tokens, [], 6), SamplingParams(), torch.Generator())
    assert proposal.token == 7 and draft.hits == 1  # "5 6" was followed by 7
    miss = draft.propose(DraftContext(3, [9, 10, 11], [], 3), SamplingParams(), torch.Generator())
    assert miss.token == 0 and draft.hits == 1  # no match: the fallback's token
