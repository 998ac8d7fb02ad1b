"""A cycle-time model of SPD: predicted tokens per cycle, cycle time and wall-clock speedup.

Acceptance (docs/SPD.md 1.5): with i.i.d. per-token acceptance alpha, an accepted token costs one
cycle and a rejected one n cycles, so ``tokens/cycle = 1 / (1 + (n - 1)(1 - alpha))`` and
``E = n tokens/cycle``. Time: every stage computes its token in parallel; stage 0 (the controller)
then needs the last stage's verdict (one hop) and verifies; a co-located draft runs on stage 0
after its layers, a dedicated one overlaps them (plus a hop each way). Pure functions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CycleCosts:
    """Measured or assumed per-cycle costs, in milliseconds."""

    stage_ms: tuple[float, ...]  # compute of each stage for one token
    draft_ms: float = 0.0  # the PDM's forward per cycle
    verify_ms: float = 0.0  # verification and sampling on stage 0
    hop_ms: float = 0.0  # one point-to-point message
    placement: str = "colocated"  # or "dedicated"
    workers: int = 0  # devices/cores the stages share (0: one each, no sharing)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ms)


def tokens_per_cycle(alpha: float, num_stages: int) -> float:
    """Closed form for i.i.d. acceptance: 1 / (1 + (n - 1)(1 - alpha))."""
    return 1.0 / (1.0 + (num_stages - 1) * (1.0 - alpha))


def equivalent_accept_length(alpha: float, num_stages: int) -> float:
    return num_stages * tokens_per_cycle(alpha, num_stages)


def cycle_ms(costs: CycleCosts) -> float:
    """The critical path of one steady cycle."""
    stage0 = costs.stage_ms[0]
    if costs.placement == "colocated":
        stage0 += costs.draft_ms
    else:  # the draft rank works while stage 0 computes; its answer costs a hop
        stage0 = max(stage0, costs.draft_ms + 2 * costs.hop_ms)
    busiest = max([stage0, *costs.stage_ms[1:]])
    if costs.workers:  # more stages than cores: they take turns
        busiest = max(busiest, (sum(costs.stage_ms) + costs.draft_ms) / costs.workers)
    return busiest + costs.hop_ms + costs.verify_ms


def predicted_tokens_per_s(costs: CycleCosts, alpha: float) -> float:
    return 1000.0 * tokens_per_cycle(alpha, costs.num_stages) / cycle_ms(costs)


def speedup(costs: CycleCosts, alpha: float, autoregressive_ms_per_token: float) -> float:
    """Predicted SPD decode speed over an autoregressive baseline of the given ms/token."""
    return predicted_tokens_per_s(costs, alpha) * autoregressive_ms_per_token / 1000.0


def split_costs(total_ms: float, num_stages: int, draft_ms: float = 0.0, verify_ms: float = 0.0,
                hop_ms: float = 0.0, placement: str = "colocated") -> CycleCosts:
    """Costs for an even split of a model whose single-device step takes ``total_ms``."""
    return CycleCosts(tuple([total_ms / num_stages] * num_stages), draft_ms, verify_ms, hop_ms, placement)


def simulate_tokens_per_cycle(alpha: float, num_stages: int, verdicts: int, seed: int = 0) -> float:
    """Monte Carlo through the schedule's own plan (warm-up excluded): checks the closed form."""
    from spd_megatron.schedule.plan import build_plan

    rng = random.Random(seed)
    plan = build_plan(num_stages, "".join("A" if rng.random() < alpha else "R" for _ in range(verdicts)))
    committed = sum(len(c.committed) for c in plan)
    return committed / (len(plan) - (num_stages - 1))
