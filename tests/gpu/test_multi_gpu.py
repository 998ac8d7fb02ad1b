"""Two or more GPUs, NCCL: the issue-14 protocol and placement rules on real devices.

- SPD over NCCL with anchors reported back to stage 0 and whole-prompt prefill messages (the
  pattern that could deadlock on one stream per rank pair) equals autoregressive decoding.
- A dedicated draft rank on a full node (2 model ranks + 1 draft on 2 GPUs): cpu:gloo,cuda:nccl,
  the model ranks keep NCCL, the draft shares a GPU and talks through host memory; still lossless.
- TP=2 with CUDA graphs where one rank's capture fails: both ranks fall back to eager steps.
Each test spawns its ranks, drops the gloo group tests/multiproc.py starts, and lets init_parallel
pick the backend as a launch would. Skipped with fewer than 2 GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch
from gpu_helpers import needs_cuda
from helpers import tiny_config
from multiproc import _free_port, run_distributed

pytestmark = [pytest.mark.gpu, needs_cuda,
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs (NCCL ranks need a GPU each)")]
NEW = 12


def _launch(rank, world_size, port, cfg, extra_ranks=0):
    """Re-initialise as a launched job would (NCCL where it fits); returns the engine."""
    import torch.distributed as dist

    from spd_megatron.engine import build_engine
    from spd_megatron.parallel.init import init_parallel

    dist.destroy_process_group()
    os.environ.update(MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world_size))
    return build_engine(cfg, init_parallel(cfg.parallel, extra_ranks=extra_ranks))


def _colocated(rank, world_size, port, ckpt):
    from spd_megatron.draft import AdversarialDraft, OracleDraft

    cfg = tiny_config(ckpt, pp=2, model__layer_spec="local", schedule__name="spd", draft__num_layers=2)
    cfg.schedule.prefill_chunk_size = 0  # the whole prompt in one message
    engine = _launch(rank, world_size, port, cfg)
    link = engine.schedule.link
    assert link.device.type == "cuda" and link.reverse is not None
    prompt = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    from spd_megatron.schedule.autoregressive import AutoregressiveSchedule

    ref = AutoregressiveSchedule(engine.stage, link, engine.schedule.sampling).generate(prompt, NEW).output_ids
    pdm = engine.schedule.host.draft if rank == 0 else None
    for draft in (pdm, OracleDraft(prompt + ref, 256), AdversarialDraft(prompt + ref, 256)):
        if rank == 0:
            engine.schedule.host.draft = draft
        got = engine.schedule.generate(prompt, NEW).output_ids
        assert rank != 0 or got == ref, (type(draft).__name__, got, ref)


def _dedicated(rank, world_size, port, ckpt):
    import torch.distributed as dist

    cfg = tiny_config(ckpt, pp=2, model__layer_spec="local", schedule__name="spd", draft__num_layers=2,
                      draft__placement="dedicated")
    engine = _launch(rank, world_size, port, cfg, extra_ranks=1)
    assert "nccl" in str(dist.get_backend()) and "gloo" in str(dist.get_backend())
    is_draft = engine.ctx.is_draft_rank
    assert engine.ctx.comm_device.type == ("cpu" if is_draft else "cuda")
    assert is_draft or engine.ctx.cpu_peers == frozenset({2})
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    if not is_draft:
        from spd_megatron.schedule.autoregressive import AutoregressiveSchedule

        ref = AutoregressiveSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling)
        ref = ref.generate(prompt, NEW).output_ids
    got = engine.schedule.generate(prompt, NEW).output_ids
    assert rank != 0 or got == ref


def _tp_capture_fails_on_one_rank(rank, world_size, port, ckpt):
    from spd_megatron.target import cuda_graphs

    cfg = tiny_config(ckpt, tp=2, model__layer_spec="local", model__cuda_graphs=True)
    engine = _launch(rank, world_size, port, cfg)
    graphs = engine.stage.decode_graphs
    assert graphs is not None
    prompt = [5, 17, 99, 3, 42, 7, 250]
    engine.stage.decode_graphs = None
    ref = engine.schedule.generate(prompt, NEW).output_ids
    engine.stage.decode_graphs = graphs
    if rank == 1:
        def broken(step, pool):
            raise RuntimeError("capture failed on purpose")
        cuda_graphs._capture_graph = broken
    got = engine.schedule.generate(prompt, NEW).output_ids
    assert graphs.disabled, "a failed peer capture must disable graphs on every TP rank"
    assert got == ref


@pytest.mark.parametrize("worker,ranks", [(_colocated, 2), (_dedicated, 3), (_tp_capture_fails_on_one_rank, 2)],
                         ids=["colocated-nccl", "dedicated-full-node", "tp-capture-agreement"])
def test_multi_gpu(tiny_models, worker, ranks):
    run_distributed(worker, ranks, _free_port(), tiny_models["llama"][1], timeout_s=300, start="spawn")
