"""The dedicated draft placement: world = TP x PP + 1, the PDM on its own rank; still lossless."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_greedy, load_hf, tiny_config
from multiproc import run_distributed

from spd_megatron.draft import AdversarialDraft, OracleDraft
from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.schedule.autoregressive import AutoregressiveSchedule

NEW = 16


def _worker(rank, world_size, ckpt, pp, prompt, reference):
    cfg = tiny_config(ckpt, pp=pp, schedule__name="spd", draft__placement="dedicated", draft__num_layers=2)
    engine = build_engine(cfg, init_parallel(cfg.parallel, extra_ranks=1))
    assert engine.ctx.is_draft_rank == (rank == world_size - 1)
    if not engine.ctx.is_draft_rank:  # the oracle of the oracle: plain pipelined decoding
        ar = AutoregressiveSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling)
        got = ar.generate(prompt, NEW)
        assert not engine.stage.placement.is_first or got.output_ids == reference
    full = prompt + reference
    for kind in ("pdm", "oracle", "adversarial"):
        if engine.ctx.is_draft_rank and kind != "pdm":
            engine.schedule.host.draft = {"oracle": OracleDraft, "adversarial": AdversarialDraft}[kind](full, 260)
        out = engine.schedule.generate(prompt, NEW)
        if engine.stage is not None and engine.stage.placement.is_first:
            assert out.output_ids == reference, kind
            s = out.stats
            if kind == "oracle":
                assert s.accepted == s.verified == NEW - 1 and s.cycles == NEW - 1 + pp - 1
            if kind == "adversarial":
                assert s.accepted == 0 and s.cycles == (NEW - 1) * pp


@pytest.mark.distributed
@pytest.mark.parametrize("pp", [2, 3])
def test_dedicated_draft_rank_is_lossless(tiny_models, pp):
    hf_dir, ckpt = tiny_models["llama"]
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    reference = hf_greedy(load_hf(hf_dir), prompt, NEW)
    run_distributed(_worker, pp + 1, ckpt, pp, prompt, reference, timeout_s=180)
