"""tools/simulate.py --eval: the cycle-time model against an eval summary (pure arithmetic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "simulate.py"
_spec = importlib.util.spec_from_file_location("simulate", _PATH)
simulate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simulate)


def _summary(alpha, n, tokens_per_cycle, phases_per_token):
    return {"main": "spd", "configs": {"spd": {
        "alpha": {"pooled": alpha}, "tokens_per_cycle": {"pooled": tokens_per_cycle},
        "E": {"pooled": n * tokens_per_cycle}, "phase_ms_per_token": phases_per_token,
        "decode_tokens_per_s": {"pooled": 1000.0 / phases_per_token["decode"]}}}}


def test_a_run_that_follows_the_model_has_zero_error():
    alpha, n, hop = 0.6, 4, 0.5
    tpc = 1 / (1 + (n - 1) * (1 - alpha))
    per_cycle = {"stage_compute": 20.0, "draft": 5.0, "verify": 1.0}
    cycle = 20.0 + 5.0 + hop + 1.0  # co-located draft on stage 0, one hop, verification
    phases = {k: v / tpc for k, v in per_cycle.items()} | {"decode": cycle / tpc, "comm_wait": 0.0, "other": 0.0}
    out = simulate.validate_eval(_summary(alpha, n, tpc, phases), hop)
    assert out["stages"] == n
    assert out["E_error"] == pytest.approx(0.0, abs=1e-9)
    assert out["cycle_error"] == pytest.approx(0.0, abs=1e-9)
    assert out["predicted_tokens_per_s"] == pytest.approx(out["measured_tokens_per_s"])


def test_slower_cycles_and_correlated_accepts_show_up_as_errors():
    alpha, n = 0.5, 2
    tpc_measured = 0.75  # more than the i.i.d. 2/3: accepts came in runs
    phases = {"stage_compute": 10.0, "draft": 2.0, "verify": 0.0, "comm_wait": 0.0, "other": 3.0, "decode": 20.0}
    out = simulate.validate_eval(_summary(alpha, n, tpc_measured, phases), 0.0)
    assert out["E_error"] == pytest.approx(0.75 / (2 / 3) - 1)
    assert out["measured_cycle_ms"] == pytest.approx(20.0 * 0.75)
    assert out["predicted_cycle_ms"] == pytest.approx((10.0 + 2.0) * 0.75)
