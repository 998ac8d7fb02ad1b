"""The server's /metrics, in Prometheus text format (no client library needed).

Names follow vLLM's where one exists, with our prefix: ``spd:num_requests_running``,
``spd:time_to_first_token_seconds``, ``spd:spec_decode_num_accepted_tokens_total``, and
``spd:spec_decode_num_accepted_tokens_per_pos_total{position=...}``. In SPD each cycle verifies
one draft token, so drafts = draft tokens = verified tokens; ``position`` is the draft's
look-ahead (in-flight tokens ahead of it when it was proposed: the report's "by fill"). Ours
alone: acceptance rate, tokens per cycle and E (equivalent accept length) over every request
served, and decode tokens/s (of the last request, and as counters for rates).
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, count in zip(list(BUCKETS) + ["+Inf"], self.counts):
            cum += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cum}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {self.n}"]


class ServeMetrics:
    """Counters fed by the decode thread (``observe_result``) and the HTTP handlers."""

    def __init__(self, model: str, pipeline_depth: int) -> None:
        self.model, self.depth = model, pipeline_depth
        self.lock = threading.Lock()
        self.counters: dict[str, float] = defaultdict(float)
        self.labelled: dict[tuple[str, str], float] = defaultdict(float)  # (name, 'a="x",b="y"')
        self.hist = {k: Histogram() for k in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                                              "request_queue_time_seconds")}
        self.last_decode_tps = 0.0

    def count_response(self, endpoint: str, code: int) -> None:
        with self.lock:
            self.labelled["requests_total", f'endpoint="{endpoint}",code="{code}"'] += 1

    def observe_finished(self, reason: str, latency_s: float) -> None:
        with self.lock:
            self.labelled["request_success_total", f'finished_reason="{reason}"'] += 1
            self.hist["e2e_request_latency_seconds"].observe(latency_s)

    def observe_result(self, job, result) -> None:
        """A sequence that left the pipeline (decode thread)."""
        stats = result.stats
        with self.lock:
            c = self.counters
            c["prompt_tokens_total"] += stats.prompt_tokens
            c["generation_tokens_total"] += stats.new_tokens
            c["decode_tokens_total"] += max(stats.new_tokens - 1, 0)
            c["decode_seconds_total"] += stats.decode_seconds
            c["spec_decode_cycles_total"] += stats.cycles
            c["spec_decode_num_drafts_total"] += stats.verified
            c["spec_decode_num_draft_tokens_total"] += stats.verified
            c["spec_decode_num_accepted_tokens_total"] += stats.accepted
            for fill, n in stats.verified_by_fill.items():
                pos = f'position="{fill}"'
                self.labelled["spec_decode_num_draft_tokens_per_pos_total", pos] += n
                self.labelled["spec_decode_num_accepted_tokens_per_pos_total", pos] += stats.accepted_by_fill.get(fill, 0)
            if stats.stop_reason == "cancelled":  # client gone, stop string, timeout or shutdown
                self.labelled["request_cancelled_total", f'reason="{job.cancel_reason}"'] += 1
            self.last_decode_tps = stats.decode_tokens_per_s
            if job.first_token:
                self.hist["time_to_first_token_seconds"].observe(job.first_token - job.created)
            if job.started:
                self.hist["request_queue_time_seconds"].observe(job.started - job.created)

    def render(self, running: int, waiting: int) -> str:
        """The Prometheus text exposition of everything above."""
        with self.lock:
            c = dict(self.counters)
            labelled = dict(self.labelled)
            lines = [f'spd:model_info{{model="{self.model}",pipeline_depth="{self.depth}"}} 1',
                     f"spd:num_requests_running {running}", f"spd:num_requests_waiting {waiting}",
                     f"spd:decode_tokens_per_second {self.last_decode_tps}"]
            for name in ("prompt_tokens_total", "generation_tokens_total", "decode_tokens_total",
                         "decode_seconds_total", "spec_decode_cycles_total", "spec_decode_num_drafts_total",
                         "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"):
                lines.append(f"spd:{name} {c.get(name, 0.0)}")
            for (name, labels), value in sorted(labelled.items()):
                lines.append(f"spd:{name}{{{labels}}} {value}")
            lines += self._spd_ratios(c, labelled)
            for name, hist in self.hist.items():
                lines += hist.lines(f"spd:{name}")
        return "\n".join(lines) + "\n"

    def _spd_ratios(self, c: dict, labelled: dict) -> list[str]:
        verified, cycles = c.get("spec_decode_num_draft_tokens_total", 0), c.get("spec_decode_cycles_total", 0)
        per_cycle = c.get("decode_tokens_total", 0) / cycles if cycles else 0.0
        lines = [f"spd:spec_decode_acceptance_rate {c.get('spec_decode_num_accepted_tokens_total', 0) / verified if verified else 0.0}",
                 f"spd:spec_decode_tokens_per_cycle {per_cycle}",
                 f"spd:spec_decode_equivalent_accept_length {self.depth * per_cycle}"]
        for (name, labels), n in sorted(labelled.items()):
            if name == "spec_decode_num_draft_tokens_per_pos_total" and n:
                accepted = labelled.get(("spec_decode_num_accepted_tokens_per_pos_total", labels), 0)
                lines.append(f"spd:spec_decode_acceptance_rate_per_pos{{{labels}}} {accepted / n}")
        return lines
