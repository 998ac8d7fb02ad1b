"""The simulated NCCL network itself (tests/nccl_sim.py), on hand-written traces: the prefill cycle
of issue 14 deadlocks on one stream per pair and passes with the reverse direction on its own group."""

from __future__ import annotations

import pytest
from nccl_sim import Deadlock, simulate

BIG = 1 << 20  # a prompt chunk's hidden rows / anchors: more than the buffer


def prefill_traces(back: str) -> dict:
    """Stage 0 sends two chunks, then reads stage 1's anchors; stage 1 answers after each chunk.
    ``back``: the group of stage 1's payloads to stage 0."""
    stage0 = [("send", 0, 1, "control", 40), ("send", 1, 1, "default", BIG),
              ("send", 2, 1, "control", 40), ("send", 3, 1, "default", BIG),
              ("recv", 4, 1, "control", 40), ("wait", 4), ("recv", 5, 1, back, BIG), ("wait", 5),
              ("recv", 6, 1, "control", 40), ("wait", 6), ("recv", 7, 1, back, BIG), ("wait", 7),
              ("wait", 1), ("wait", 3)]
    stage1 = []
    for chunk in range(2):
        k = 4 * chunk
        stage1 += [("recv", k, 0, "control", 40), ("wait", k), ("recv", k + 1, 0, "default", BIG),
                   ("wait", k + 1), ("send", k + 2, 0, "control", 40), ("send", k + 3, 0, back, BIG)]
    return {0: stage0, 1: stage1 + [("wait", 3), ("wait", 7)]}


def test_one_stream_per_pair_deadlocks_once_messages_exceed_the_buffer():
    with pytest.raises(Deadlock, match="rank 0 waits at event 7: recv #0 from rank 1 on default"):
        simulate(prefill_traces("default"), capacity=BIG - 1)
    simulate(prefill_traces("default"), capacity=4 * BIG)  # small messages hide it


@pytest.mark.parametrize("capacity", [0, BIG - 1, 4 * BIG])
def test_reverse_direction_on_its_own_group_cannot_cycle(capacity):
    simulate(prefill_traces("reverse"), capacity=capacity)


def test_unmatched_receive_is_reported():
    with pytest.raises(Deadlock, match="rank 1 waits at event 1: recv #0 from rank 0"):
        simulate({0: [], 1: [("recv", 0, 0, "default", 8), ("wait", 0)]}, capacity=0)
