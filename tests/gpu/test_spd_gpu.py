"""SPD greedy == autoregressive greedy on a GPU: two pipeline stages as two processes sharing the
GPU (spawned; gloo carries the p2p messages through host memory), eager and with CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import needs_cuda
from helpers import tiny_config
from multiproc import run_distributed

pytestmark = [pytest.mark.gpu, needs_cuda]
NEW = 20


def _worker(rank, world_size, ckpt):
    from spd_megatron.draft import OracleDraft
    from spd_megatron.engine import build_engine, build_schedule
    from spd_megatron.parallel.init import init_parallel
    from spd_megatron.schedule.spd import SPDSchedule
    from spd_megatron.target.cuda_graphs import make_decode_graphs

    cfg = tiny_config(ckpt, model__layer_spec="local")
    engine = build_engine(cfg, init_parallel(cfg.parallel))
    assert engine.stage.device.type == "cuda" and engine.schedule.link.device.type == "cpu"
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = engine.schedule.generate(prompt, NEW).output_ids
    first = engine.stage.placement.is_first
    cfg.schedule.name, cfg.draft.num_layers = "spd", 1
    for graphs in (False, True):
        if graphs:
            engine.stage.decode_graphs = make_decode_graphs(engine.stage, 1, "gloo")
        pdm = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
        oracle = OracleDraft(prompt + ref, engine.arch.vocab_size) if first else None
        spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=oracle)
        outputs = [s.generate(prompt, NEW).output_ids for s in (pdm, spd, engine.schedule)]
        if graphs:
            assert engine.stage.decode_graphs.disabled is None, engine.stage.decode_graphs.disabled
        if first:
            assert outputs == [ref, ref, ref], (graphs, outputs, ref)


def test_spd_equals_autoregressive_on_gpu(tiny_models):
    run_distributed(_worker, 2, tiny_models["llama"][1], timeout_s=300, start="spawn")
