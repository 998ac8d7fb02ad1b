"""StageLink's wire protocol, with and without pre-posted receives, on two gloo ranks.

With a control group the next header receive from a peer and (after a decode step) the ring's next
hidden row are posted before the peer sends; after a prompt chunk or STOP no payload receive is
left pending. Without one, every receive is posted on demand. Payloads arrive intact either way.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_distributed

from spd_megatron.config import ParallelConfig
from spd_megatron.parallel.init import init_parallel
from spd_megatron.parallel.link import Header, Op, StageLink

H = 4
MESSAGES = [(Op.PREFILL, 0, 3), (Op.STEP, 3, 1), (Op.STEP, 4, 1), (Op.STOP, 0, 0),  # a sequence
            (Op.PREFILL, 0, 2), (Op.STEP, 2, 1), (Op.STOP, 0, 0)]  # and the next one


def hidden_for(position: int, count: int) -> torch.Tensor:
    return torch.arange(count * H, dtype=torch.float32).view(count, 1, H) + 100 * position  # [count, 1, h]


def _worker(rank, world_size, prepost):
    ctx = init_parallel(ParallelConfig(prepost_receives=prepost))
    control = ctx.claim_control_group()
    assert (control is not None) == prepost and ctx.claim_control_group() is None  # one link per group
    link = StageLink(rank, 1 - rank if rank else None, None if rank else 1, 0, 1, H, torch.float32,
                     timeout_s=30, control_group=control)
    assert link.preposts == prepost
    if rank == 0:
        for op, position, count in MESSAGES:
            link.send_next(Header(op, position, count, 7, 0), hidden_for(position, count) if count else None)
        with pytest.raises(RuntimeError, match="2 hidden rows"):
            link.send_next(Header(Op.STEP, 0, 1), hidden_for(0, 2))
        link.flush()
        return
    for op, position, count in MESSAGES:
        header = link.recv_prev()
        assert (header.op, header.position, header.count, header.token) == (op, position, count, 7)
        if count:
            torch.testing.assert_close(link.recv_hidden(count), hidden_for(position, count), rtol=0, atol=0)
        if prepost:
            assert 0 in link._header_posts  # the next header receive is already posted
            assert (link._row_post is not None) == (op == Op.STEP)  # row 0 ahead only between steps
    if prepost:
        with pytest.raises(RuntimeError, match="does not follow"):
            link.recv_hidden(1)


@pytest.mark.distributed
@pytest.mark.parametrize("prepost", [True, False], ids=["preposted", "on-demand"])
def test_ring_messages_arrive_intact(prepost):
    run_distributed(_worker, 2, prepost, timeout_s=120)
