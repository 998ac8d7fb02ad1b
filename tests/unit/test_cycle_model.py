"""The cycle-time model: closed forms, and agreement with the schedule's own plan."""

from __future__ import annotations

import pytest

from spd_megatron.eval.cycle_model import (
    CycleCosts,
    cycle_ms,
    equivalent_accept_length,
    simulate_tokens_per_cycle,
    speedup,
    tokens_per_cycle,
)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
def test_closed_form_matches_the_plan_for_iid_acceptance(n, alpha):
    closed = tokens_per_cycle(alpha, n)
    assert abs(simulate_tokens_per_cycle(alpha, n, verdicts=4000, seed=n) - closed) < 0.02
    assert equivalent_accept_length(1.0, n) == n and equivalent_accept_length(0.0, n) == 1


def test_cycle_time_critical_path():
    colocated = CycleCosts((50.0, 40.0), draft_ms=10.0, verify_ms=1.0, hop_ms=0.5)
    assert cycle_ms(colocated) == 60.0 + 0.5 + 1.0  # the draft runs after stage 0's layers
    dedicated = CycleCosts((50.0, 40.0), draft_ms=10.0, verify_ms=1.0, hop_ms=0.5, placement="dedicated")
    assert cycle_ms(dedicated) == 50.0 + 0.5 + 1.0  # the draft overlaps stage 0
    shared = CycleCosts((25.0,) * 4, workers=2)  # 4 stages on 2 cores: 50 ms of work per core
    assert cycle_ms(shared) == 50.0
    ideal = CycleCosts((25.0,) * 4)
    assert speedup(ideal, 1.0, autoregressive_ms_per_token=100.0) == pytest.approx(4.0)
