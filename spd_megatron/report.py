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
    return {"prompts": len(results), "new_tokens": new, "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0}


def print_stats_table(results: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "prompt tok", "new tok", "prefill s", "decode s", "decode tok/s", "ms/tok",
                "stage compute s", "comm wait s", "stop"):
        table.add_column(col, justify="right")
    for i, r in enumerate(results):
        s = r["stats"]
        table.add_row(str(i), str(s["prompt_tokens"]), str(s["new_tokens"]), f"{s['prefill_seconds']:.2f}",
                      f"{s['decode_seconds']:.2f}", f"{s['decode_tokens_per_s']:.1f}",
                      f"{s['ms_per_token']:.1f}", f"{s['stage_compute_seconds']:.2f}",
                      f"{s['comm_wait_seconds']:.2f}", s["stop_reason"])
    Console(stderr=True, width=150).print(table)
