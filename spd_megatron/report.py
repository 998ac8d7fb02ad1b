"""Rank-0 output: streaming text, the end-of-run stats table, the JSON report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from spd_megatron.metrics import DecodeStats


class TextStreamer:
    """Prints new text as tokens are committed (decodes the whole output, prints the new suffix)."""

    def __init__(self, tokenizer: Any, out=sys.stdout) -> None:
        self.tokenizer, self.out, self.printed = tokenizer, out, ""

    def __call__(self, new_ids: list[int]) -> None:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def result_record(prompt: str, prompt_ids: list[int], output_ids: list[int], text: str,
                  stats: DecodeStats, extra: dict | None = None) -> dict:
    """One entry of the report's ``results`` list."""
    return {"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": output_ids, "text": text,
            "stats": stats.to_dict(), **(extra or {})}


def write_report(path: str, config: dict, results: list[dict], summary: dict) -> None:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"config": config, "summary": summary, "results": results}, indent=2))


def summarize(results: list[dict]) -> dict:
    """Totals over prompts: tokens, seconds, and decode tokens/s over all decode time."""
    new = sum(r["stats"]["new_tokens"] for r in results)
    decode_s = sum(r["stats"]["decode_seconds"] for r in results)
    prefill_s = sum(r["stats"]["prefill_seconds"] for r in results)
    decode_tokens = sum(max(r["stats"]["new_tokens"] - 1, 0) for r in results)
    verified = sum(r["stats"].get("verified", 0) for r in results)
    accepted = sum(r["stats"].get("accepted", 0) for r in results)
    cycles = sum(r["stats"].get("cycles", 0) for r in results)
    depth = results[0]["stats"].get("pipeline_depth", 1) if results else 1
    summary = {"prompts": len(results), "new_tokens": new, "prefill_seconds": prefill_s,
               "decode_seconds": decode_s,
               "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0}
    if verified:  # pooled over prompts, and the mean of per-prompt values (the paper reports both)
        summary.update(
            acceptance_rate=accepted / verified,
            tokens_per_cycle=decode_tokens / cycles if cycles else 0.0,
            equivalent_accept_length=depth * decode_tokens / cycles if cycles else 0.0,
            mean_acceptance_rate=_mean(r["stats"]["acceptance_rate"] for r in results),
            mean_equivalent_accept_length=_mean(r["stats"]["equivalent_accept_length"] for r in results),
        )
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


_COLUMNS = [  # header, stats key, format
    ("prompt tok", "prompt_tokens", "{}"), ("new tok", "new_tokens", "{}"),
    ("prefill s", "prefill_seconds", "{:.2f}"), ("decode s", "decode_seconds", "{:.2f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("ms/tok", "ms_per_token", "{:.1f}"),
    ("stage s", "stage_compute_seconds", "{:.2f}"), ("wait s", "comm_wait_seconds", "{:.2f}"),
]
_SPD_COLUMNS = [
    ("cycles", "cycles", "{}"), ("alpha", "acceptance_rate", "{:.3f}"),
    ("tok/cycle", "tokens_per_cycle", "{:.3f}"), ("E", "equivalent_accept_length", "{:.2f}"),
    ("rollbacks", "rollbacks", "{}"), ("draft s", "draft_seconds", "{:.2f}"),
]


_COMPACT = {"new_tokens": "new", "prefill_seconds": "prefill", "decode_seconds": "decode",  # key: header
            "decode_tokens_per_s": "tok/s", "ms_per_token": "ms/tok", "acceptance_rate": "alpha",
            "equivalent_accept_length": "E", "stop_reason": "stop"}
COMPACT_BELOW = 100  # terminal columns under which the compact layout is used


def print_stats_table(results: list[dict], title: str, console=None) -> None:
    """The per-prompt stats table on stderr, sized to the terminal (rich detects its width).

    The full layout when it fits; under COMPACT_BELOW columns, or when it would not fit, a compact
    one (fewer columns, no vertical rules); the JSON report always has every number.
    """
    from rich.console import Console
    from rich.measure import Measurement

    console = console or Console(stderr=True)
    table = stats_table(results, title, compact=False)
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if console.width < COMPACT_BELOW or natural > console.width:
        table = stats_table(results, title, compact=True)
    console.print(table)


def stats_table(results: list[dict], title: str, compact: bool):
    from rich import box
    from rich.table import Table

    speculative = any(r["stats"].get("verified") for r in results)
    columns = _COLUMNS + (_SPD_COLUMNS if speculative else []) + [("stop", "stop_reason", "{}")]
    if compact:
        columns = [(_COMPACT[key], key, fmt) for _, key, fmt in columns if key in _COMPACT]
    table = Table(title=title, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                  caption="times in seconds; every column: report.json=PATH" if compact else None)
    table.add_column("#", justify="right")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for i, r in enumerate(results):
        table.add_row(str(i), *(fmt.format(r["stats"][key]) for _, key, fmt in columns))
    return table
