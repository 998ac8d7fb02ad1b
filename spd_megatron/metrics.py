"""Decode statistics: what the stats table and the JSON report show.

Speculative terms follow vLLM / the SPD paper: a draft is *verified* once its position's target
logits exist; it is *accepted* or replaced by the *recovered* (target) token. Over a run:
acceptance rate alpha = accepted / verified, tokens per cycle = committed decode tokens / cycles,
and equivalent accept length E = n x tokens per cycle (the paper's "theoretical speedup").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    """Counters and timers of one sequence, recorded on the reporting rank (stage 0, TP 0)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    pipeline_depth: int = 1  # n for SPD (a cycle = one stage step); 1 for autoregressive
    verified: int = 0
    accepted: int = 0
    rollbacks: int = 0
    verified_by_fill: dict = field(default_factory=dict)  # in-flight tokens ahead of the draft -> count
    accepted_by_fill: dict = field(default_factory=dict)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stage_compute_seconds: float = 0.0  # this rank's model forwards during decode
    draft_seconds: float = 0.0  # draft forwards (PDM) on this rank
    verify_seconds: float = 0.0  # verification and sampling on this rank
    comm_wait_seconds: float = 0.0  # this rank's time blocked in receives during decode
    compile_seconds: float = 0.0  # model.compile: this rank's stage compilation at start-up (0: eager)
    stop_reason: str = ""
    _t0: float = field(default=0.0, repr=False)
    _t_first: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def mark_first_token(self) -> None:
        self._t_first = time.perf_counter()
        self.prefill_seconds = self._t_first - self._t0

    def finish(self) -> None:
        self.decode_seconds = time.perf_counter() - self._t_first

    def observe_verdict(self, accepted: bool, fill: int) -> None:
        self.verified += 1
        self.accepted += int(accepted)
        self.rollbacks += int(not accepted)
        self.verified_by_fill[fill] = self.verified_by_fill.get(fill, 0) + 1
        self.accepted_by_fill[fill] = self.accepted_by_fill.get(fill, 0) + int(accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        """Tokens committed by decode cycles (the prefill's first token excluded) per cycle."""
        return (self.new_tokens - 1) / self.cycles if self.cycles else 0.0

    @property
    def equivalent_accept_length(self) -> float:
        return self.pipeline_depth * self.tokens_per_cycle

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which comes from the prefill) per decode second."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.decode_tokens_per_s if self.decode_tokens_per_s > 0 else 0.0

    def acceptance_by_fill(self) -> dict[int, float]:
        return {f: self.accepted_by_fill[f] / v for f, v in sorted(self.verified_by_fill.items())}

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for name in ("acceptance_rate", "tokens_per_cycle", "equivalent_accept_length",
                     "decode_tokens_per_s", "ms_per_token"):
            out[name] = getattr(self, name)
        out["acceptance_by_fill"] = self.acceptance_by_fill()
        return out
