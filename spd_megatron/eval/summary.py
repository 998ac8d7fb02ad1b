"""The eval summary: per configuration, pooled and mean-over-samples metrics; speedups over baselines.

Pooled = counters summed over samples, then divided (alpha = sum accepted / sum verified, tokens
per cycle = sum decode tokens / sum cycles, E = n x that, tokens/s = sum tokens / sum seconds).
Mean = the average of the per-sample values (the SPD paper reports both). Speedups compare the
main configuration with each baseline on the prompts both have, as ratios of pooled tokens/s.
"""

from __future__ import annotations

from collections import Counter

from spd_megatron.eval.records import decode_tokens

PHASES = {"stage_compute": "stage_compute_seconds", "draft": "draft_seconds",
          "verify": "verify_seconds", "comm_wait": "comm_wait_seconds"}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _pooled_and_mean(pooled, records: list[dict], key: str) -> dict:
    return {"pooled": pooled, "mean": _mean(r[key] for r in records)}


def acceptance_by_position_summary(records: list[dict]) -> dict:
    """Pooled accepted/verified per draft position, and the mean of per-sample rates."""
    verified, accepted = Counter(), Counter()
    for r in records:
        for k, v in (r["stats"].get("verified_by_fill") or {}).items():
            verified[str(k)] += v
            accepted[str(k)] += (r["stats"].get("accepted_by_fill") or {}).get(k, 0)
    positions = sorted(verified, key=int)
    return {"pooled": {k: accepted[k] / verified[k] for k in positions if verified[k]},
            "mean": {k: _mean(r["acceptance_by_position"].get(k) for r in records) for k in positions},
            "verified": {k: verified[k] for k in positions}}


def phase_ms_per_token(records: list[dict]) -> dict:
    """Reporting rank's decode time per decode token, split by phase; ``other`` = the rest."""
    tokens = sum(decode_tokens(r["stats"]) for r in records) or 1
    decode_ms = 1000.0 * sum(r["stats"]["decode_seconds"] for r in records) / tokens
    phases = {name: 1000.0 * sum(r["stats"].get(key, 0.0) for r in records) / tokens
              for name, key in PHASES.items()}
    phases["other"] = max(decode_ms - sum(phases.values()), 0.0)
    return {"decode": decode_ms, **phases}


def summarize_config(records: list[dict]) -> dict:
    """Pooled and mean metrics of one configuration's records."""
    stats = [r["stats"] for r in records]
    tokens = sum(decode_tokens(s) for s in stats)
    cycles = sum(s.get("cycles", 0) for s in stats)
    verified = sum(s.get("verified", 0) for s in stats)
    depth = stats[0].get("pipeline_depth", 1) if stats else 1
    decode_s, prefill_s = sum(s["decode_seconds"] for s in stats), sum(s["prefill_seconds"] for s in stats)
    new_tokens = sum(s["new_tokens"] for s in stats)
    tokens_per_cycle = _ratio(tokens, cycles)
    return {
        "prompts": len(records), "new_tokens": new_tokens, "decode_tokens": tokens,
        "decode_seconds": decode_s, "prefill_seconds": prefill_s,
        "alpha": _pooled_and_mean(_ratio(sum(s.get("accepted", 0) for s in stats), verified), records, "alpha")
        if verified else None,
        "acceptance_by_position": acceptance_by_position_summary(records),
        "tokens_per_cycle": _pooled_and_mean(tokens_per_cycle, records, "tokens_per_cycle"),
        "E": _pooled_and_mean(depth * tokens_per_cycle if tokens_per_cycle else None, records, "E"),
        "decode_tokens_per_s": _pooled_and_mean(_ratio(tokens, decode_s), records, "decode_tokens_per_s"),
        "prefill_tokens_per_s": _pooled_and_mean(
            _ratio(sum(s["prompt_tokens"] for s in stats), prefill_s), records, "prefill_tokens_per_s"),
        "end_to_end_tokens_per_s": _ratio(new_tokens, decode_s + prefill_s),
        "phase_ms_per_token": phase_ms_per_token(records),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in records)),
    }


def speedup(main: list[dict], baseline: list[dict]) -> dict:
    """Main over baseline on the prompts both measured: ratios of pooled tokens/s, same outputs."""
    base_by_id = {r["id"]: r for r in baseline}
    pairs = [(r, base_by_id[r["id"]]) for r in main if r["id"] in base_by_id]
    if not pairs:
        return {"prompts": 0}
    ours, theirs = summarize_config([a for a, _ in pairs]), summarize_config([b for _, b in pairs])
    return {"prompts": len(pairs),
            "decode": _ratio(ours["decode_tokens_per_s"]["pooled"] or 0.0, theirs["decode_tokens_per_s"]["pooled"]),
            "end_to_end": _ratio(ours["end_to_end_tokens_per_s"] or 0.0, theirs["end_to_end_tokens_per_s"]),
            "same_output": sum(a["output_ids"] == b["output_ids"] for a, b in pairs)}


def build_summary(main: str, records: dict[str, list[dict]], meta: dict, errors: dict[str, str]) -> dict:
    """The summary JSON: run metadata, every configuration's metrics, speedups of ``main``."""
    configs = {name: summarize_config(recs) for name, recs in records.items() if recs}
    speedups = {name: speedup(records[main], recs) for name, recs in records.items()
                if name != main and recs and records.get(main)}
    return {"main": main, **meta, "configs": configs, "speedup": speedups, "errors": errors}


def _fmt(value, spec: str = "{:.3f}") -> str:
    if isinstance(value, dict):
        value = value.get("pooled")
    return "-" if value is None else spec.format(value)


def print_summary(summary: dict) -> None:
    """A rich table on stderr: one row per configuration, speedup columns for the main one."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {summary['main']} vs baselines (pooled over prompts)")
    for col in ("config", "prompts", "alpha", "tok/cycle", "E", "decode tok/s", "prefill tok/s",
                "main's decode speedup", "main's end-to-end speedup", "same output as main"):
        table.add_column(col, justify="right")
    for name, s in summary["configs"].items():
        sp = summary["speedup"].get(name, {})
        table.add_row(name, str(s["prompts"]), _fmt(s["alpha"]), _fmt(s["tokens_per_cycle"]), _fmt(s["E"], "{:.2f}"),
                      _fmt(s["decode_tokens_per_s"], "{:.2f}"), _fmt(s["prefill_tokens_per_s"], "{:.1f}"),
                      _fmt(sp.get("decode"), "{:.2f}x"), _fmt(sp.get("end_to_end"), "{:.2f}x"),
                      f"{sp['same_output']}/{sp['prompts']}" if "same_output" in sp else "-")
    Console(stderr=True, width=160).print(table)
