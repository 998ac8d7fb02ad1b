"""Decode statistics: what the stats table and the JSON report show."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    """Counters and timers of one sequence, recorded on the reporting rank (stage 0, TP 0)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stage_compute_seconds: float = 0.0  # this rank's model forwards during decode
    comm_wait_seconds: float = 0.0  # this rank's time blocked in receives during decode
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

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which comes from the prefill) per decode second."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.decode_tokens_per_s if self.decode_tokens_per_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["ms_per_token"] = self.ms_per_token
        return out
