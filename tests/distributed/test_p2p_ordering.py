"""NCCL p2p ordering: the real schedules' message sequences, replayed on a simulated NCCL network.

Each rank runs the real schedules over gloo (prefill in chunks, accepted cycles, rollbacks, greedy
and sampling, autoregressive), with StageLink's NCCL rules switched on (``link.nccl``) and every
point-to-point operation recorded (tests/nccl_sim.py). The traces are then replayed with NCCL's
semantics: one in-order stream per rank pair and group, sends that block once the buffer is full.
Both directions of a pair on one group (the link without a reverse group, as before issue 14)
deadlock as soon as a message exceeds the buffer; with the reverse direction on its own group
(what parallel.init gives every link) the same sequences complete even with no buffer at all.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config
from multiproc import run_distributed
from nccl_sim import Deadlock, TraceRecorder, simulate

import spd_megatron.parallel.link as link_module
from spd_megatron.draft import AdversarialDraft, OracleDraft
from spd_megatron.engine import build_engine
from spd_megatron.parallel.init import init_parallel
from spd_megatron.sampling.logits import SamplingParams
from spd_megatron.schedule.autoregressive import AutoregressiveSchedule

NEW = 6
ROW_BYTES = 64 * 4  # one fp32 hidden row of the tiny model


def _decode_all(engine, prompt, is_host):
    """Autoregressive, then SPD with an oracle (accepts), an adversary (rollbacks), the PDM sampling."""
    schedule, link = engine.schedule, engine.schedule.link
    if not engine.ctx.is_draft_rank:
        AutoregressiveSchedule(engine.stage, link, schedule.sampling).generate(prompt, NEW)
    pdm = schedule.host.draft if is_host else None
    drafts = {"oracle": OracleDraft, "adversarial": AdversarialDraft}
    for kind in ("oracle", "adversarial", "pdm"):
        if is_host:
            schedule.host.draft = pdm if kind == "pdm" else drafts[kind](list(range(1, 60)), 260)
        schedule.sampling = SamplingParams(temperature=0.8 if kind == "pdm" else 0.0)
        schedule.generate(prompt, NEW)
    schedule.sampling = SamplingParams()


def _worker(rank, world_size, ckpt, pp, placement, prepost, out_dir):
    dedicated = placement == "dedicated"
    cfg = tiny_config(ckpt, pp=pp, schedule__name="spd", draft__num_layers=2, draft__placement=placement,
                      draft__allow_random=True)
    cfg.parallel.prepost_receives = prepost
    engine = build_engine(cfg, init_parallel(cfg.parallel, extra_ranks=int(dedicated)))
    engine.schedule.prefill_chunk_size = 4
    link = engine.schedule.link
    reverse, link.nccl = link.reverse, True  # replay NCCL's rules over gloo
    assert reverse is not None
    recorder = TraceRecorder(dist, {id(link.control): "control", id(reverse): "reverse"})
    is_host = engine.ctx.is_draft_rank if dedicated else rank == 0
    prompt = list(range(3, 14))  # 11 tokens: three prefill chunks
    link_module.dist = recorder
    try:
        for protocol in ("one_group", "reverse_group"):
            link.reverse = reverse if protocol == "reverse_group" else None
            recorder.events = []
            _decode_all(engine, prompt, is_host)
            (out_dir / f"{protocol}-{rank}.json").write_text(json.dumps(recorder.events))
    finally:
        link_module.dist = dist


CASES = [(2, "colocated", True), (3, "colocated", True), (2, "dedicated", True), (2, "colocated", False)]


@pytest.mark.distributed
@pytest.mark.parametrize("pp,placement,prepost", CASES, ids=["n2", "n3", "n2-dedicated", "n2-on-demand"])
def test_schedules_cannot_deadlock_on_nccl_ordering(tiny_models, tmp_path, pp, placement, prepost):
    _, ckpt = tiny_models["llama"]
    world = pp + (placement == "dedicated")
    run_distributed(_worker, world, ckpt, pp, placement, prepost, tmp_path, timeout_s=180)

    def traces(protocol):
        return {r: [tuple(e) for e in json.loads((tmp_path / f"{protocol}-{r}.json").read_text())]
                for r in range(world)}

    old, new = traces("one_group"), traces("reverse_group")
    assert sum(len(t) for t in new.values()) > 200  # the whole decode was recorded
    with pytest.raises(Deadlock):  # today's deadlock: a prompt chunk (4 rows) exceeds the buffer
        simulate(old, capacity=3 * ROW_BYTES)
    for capacity in (0, ROW_BYTES, 1 << 30):
        simulate(new, capacity=capacity)
