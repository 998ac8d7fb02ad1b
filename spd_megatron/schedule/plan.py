"""The SPD cycle plan, offline: which token each stage holds in each cycle, for given verdicts.

It follows the same rules as SPDSchedule (one injection per cycle; a token leaves the last stage
once n are in flight; its logits verify the next in-flight token; a reject bumps the epoch, and the
flushed tokens keep flowing as stale work until they leave). Used to reason about and test the
schedule without processes::

    print(format_plan(build_plan(4, "AARA")))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class PlanToken:
    position: int  # 0 = the first generated token (it comes from the prefill)
    epoch: int
    index: int  # injection counter

    def label(self, epoch: int) -> str:
        return f"t{self.position}" + ("" if self.epoch == epoch else "~")  # ~ = flushed, stale


@dataclass
class PlanCycle:
    cycle: int
    held: list[Optional[PlanToken]]  # held[s]: the token stage s processes this cycle
    epoch: int  # the controller's epoch at the start of the cycle
    verdict: Optional[tuple[int, str]] = None  # (verified position, "A" | "R")
    committed: list[int] = field(default_factory=list)  # positions committed this cycle


def build_plan(num_stages: int, verdicts: str) -> list[PlanCycle]:
    """Simulate cycles until every verdict in ``verdicts`` ("A" accept / "R" reject) is used."""
    if num_stages < 2 or set(verdicts) - {"A", "R"}:
        raise ValueError("need num_stages >= 2 and verdicts made of 'A' and 'R'")
    plan, in_flight, todo = [], [], list(verdicts)
    epoch, next_pos, index = 0, 0, 0
    while todo:
        in_flight.append(PlanToken(next_pos, epoch, index))
        index += 1
        held = [in_flight[-1 - s] if s < len(in_flight) else None for s in range(num_stages)]
        cycle = PlanCycle(len(plan), held, epoch)
        next_pos = in_flight[-1].position + 1
        if len(in_flight) == num_stages:
            exiting = in_flight.pop(0)
            if exiting.epoch == epoch and in_flight:
                verified, outcome = in_flight[0].position, todo.pop(0)
                cycle.verdict, cycle.committed = (verified, outcome), [verified]
                if outcome == "R":
                    epoch, next_pos = epoch + 1, verified
        plan.append(cycle)
    return plan


def validate_plan(plan: list[PlanCycle], num_stages: int) -> None:
    """Raise AssertionError on any broken invariant of the cycle rule."""
    for prev, cur in zip(plan, plan[1:]):
        for s in range(num_stages - 1):  # a token advances exactly one stage per cycle
            if prev.held[s] is not None:
                assert cur.held[s + 1] == prev.held[s], f"cycle {cur.cycle}: stage {s + 1} lost its token"
        if prev.verdict and prev.verdict[1] == "R":  # nothing past the verdict survives a reject
            live = [t for t in cur.held if t is not None and t.epoch == cur.epoch]
            assert [t.position for t in live] == [prev.verdict[0]], f"cycle {cur.cycle}: flush incomplete"
    committed = [p for c in plan for p in c.committed]
    assert committed == list(range(1, len(committed) + 1)), "every position is committed once, in order"


def format_plan(plan: list[PlanCycle]) -> str:
    """Rows = cycles, columns = stages; the verdict of the cycle at the end of the row."""
    num_stages = len(plan[0].held) if plan else 0
    head = "cycle | " + " ".join(f"s{s:<4}" for s in range(num_stages)) + " | verdict"
    lines = [head, "-" * len(head)]
    for c in plan:
        cells = " ".join(f"{(t.label(c.epoch) if t else '.'):<5}" for t in c.held)
        verdict = f"t{c.verdict[0]} {'accept' if c.verdict[1] == 'A' else 'REJECT'}" if c.verdict else ""
        lines.append(f"{c.cycle:>5} | {cells} | {verdict}")
    return "\n".join(lines)
