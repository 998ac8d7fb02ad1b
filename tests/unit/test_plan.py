"""The SPD cycle plan, offline: invariants and the closed-form cycle counts."""

from __future__ import annotations

import random

import pytest

from spd_megatron.schedule.plan import build_plan, format_plan, validate_plan
from spd_megatron.schedule.spd import SPDSchedule


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_random_verdicts_keep_every_invariant(n):
    rng = random.Random(n)
    for _ in range(50):
        verdicts = "".join(rng.choice("AR") for _ in range(rng.randint(1, 30)))
        plan = build_plan(n, verdicts)
        validate_plan(plan, n)
        assert [c.verdict[1] for c in plan if c.verdict] == list(verdicts)
        rejects = verdicts.count("R")
        # an accept costs one cycle, a reject n (spec 1.5), after n-1 warm-up cycles
        assert len(plan) == (n - 1) + verdicts.count("A") + rejects * n - (n - 1) * (verdicts[-1] == "R")


def test_timeline_of_the_spec_example():
    plan = build_plan(4, "AARA")
    assert [t.position if t else None for t in plan[5].held] == [5, 4, 3, 2]
    assert plan[5].verdict == (3, "R")
    assert plan[6].held[0].position == 3 and plan[6].held[1].epoch < plan[6].epoch  # refill, stale
    assert plan[9].verdict == (4, "A")  # the corrected token leaves after n cycles
    text = format_plan(plan)
    assert "t3 REJECT" in text and "t5~" in text


def test_schedule_exposes_its_plan():
    assert SPDSchedule.plan(2, "RA")[-1].verdict == (2, "A")


def test_validate_catches_a_broken_plan():
    plan = build_plan(3, "AAA")
    plan[3].held[1] = plan[3].held[0]  # a token that skipped a stage
    with pytest.raises(AssertionError):
        validate_plan(plan, 3)
