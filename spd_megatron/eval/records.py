"""Per-sample eval records and their JSONL file (one line per prompt, appended, resumable).

A record holds the prompt id, the tokens, the per-sample metrics users compare (alpha, acceptance
by draft position, tokens per cycle, E, decode and prefill tokens/s, stop reason) and the raw
``stats`` they come from, so a summary can pool counters over samples. Acceptance by draft
position is the schedule's acceptance by fill: position k = the draft was proposed with k
in-flight tokens ahead of it (0 right after a reject, n - 1 in steady state).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)

RECORD_KEYS = ("id", "config", "prompt", "prompt_tokens", "output_ids", "new_tokens", "text",
               "stop_reason", "alpha", "acceptance_by_position", "tokens_per_cycle", "E",
               "decode_tokens_per_s", "prefill_tokens_per_s", "stats")


def decode_tokens(stats: dict) -> int:
    """Tokens committed after the prefill's first token(s) (HF prompt lookup may commit several)."""
    return int(stats.get("decode_tokens", max(stats["new_tokens"] - 1, 0)))


def acceptance_by_position(stats: dict) -> dict[str, float]:
    """{position: accepted / verified} from the by-fill counters (JSON keys are strings)."""
    verified = stats.get("verified_by_fill") or {}
    accepted = stats.get("accepted_by_fill") or {}
    return {str(k): accepted.get(k, accepted.get(str(k), 0)) / v
            for k, v in sorted(verified.items(), key=lambda kv: int(kv[0])) if v}


def sample_metrics(stats: dict) -> dict:
    """The per-sample metrics of one prompt's stats (a DecodeStats dict or HF's equivalent)."""
    tokens, cycles = decode_tokens(stats), stats.get("cycles", 0)
    tokens_per_cycle = tokens / cycles if cycles else None
    prefill_s, decode_s = stats["prefill_seconds"], stats["decode_seconds"]
    verified = stats.get("verified", 0)
    return {
        "alpha": stats.get("accepted", 0) / verified if verified else None,
        "acceptance_by_position": acceptance_by_position(stats),
        "tokens_per_cycle": tokens_per_cycle,
        "E": stats.get("pipeline_depth", 1) * tokens_per_cycle if tokens_per_cycle is not None else None,
        "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
        "prefill_tokens_per_s": stats["prompt_tokens"] / prefill_s if prefill_s > 0 else 0.0,
    }


def make_record(config: str, prompt_id: str, prompt: str, output_ids: list[int], text: str,
                stats: dict) -> dict:
    """One JSONL line (keys: RECORD_KEYS)."""
    stats = json.loads(json.dumps(stats))  # by-fill dict keys become strings, as after a reload
    record = {"id": prompt_id, "config": config, "prompt": prompt, "prompt_tokens": stats["prompt_tokens"],
              "output_ids": list(output_ids), "new_tokens": stats["new_tokens"], "text": text,
              "stop_reason": stats.get("stop_reason", ""), **sample_metrics(stats), "stats": stats}
    return {key: record[key] for key in RECORD_KEYS}


class ResultsFile:
    """``<out>/<name>.jsonl`` plus ``<name>.meta.json`` (what the records were measured with).

    Resuming: records already in the file are kept and their prompts skipped; a run whose
    fingerprint (max tokens, sampling, model, schedule, ...) differs from the file's is refused.
    """

    def __init__(self, out_dir: str | Path, name: str) -> None:
        self.path = Path(out_dir) / f"{name}.jsonl"
        self.meta_path = Path(out_dir) / f"{name}.meta.json"
        self.name = name

    def read(self) -> list[dict]:
        """The records so far (a torn last line, from a killed run, is dropped)."""
        if not self.path.is_file():
            return []
        records = []
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line dropped (an interrupted run?)", self.path, lineno)
        return records

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.read()}

    def open(self, fingerprint: dict, run_info: dict) -> None:
        """Check the fingerprint against an existing file's, and record this session's run info."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        fingerprint = json.loads(json.dumps(fingerprint))
        if meta is not None and self.path.is_file():
            _check_same(meta["fingerprint"], fingerprint, self.path)
        sessions = (meta or {}).get("sessions", []) if self.path.is_file() else []
        meta = {"fingerprint": fingerprint, "sessions": sessions + [run_info]}
        self.meta_path.write_text(json.dumps(meta, indent=1))

    def meta(self) -> Optional[dict]:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def append(self, record: dict) -> None:
        """One line, flushed: a killed run loses at most the prompt it was decoding."""
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")


def _check_same(old: dict, new: dict, path: Path) -> None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise SPDError(f"{path} was measured with {key}={old.get(key)!r}, this run has {new.get(key)!r}; "
                           f"use another eval.out (or delete the file) to start over")


def fingerprint(cfg: Any) -> dict:
    """What the records of one configuration depend on (a resumed run must match it)."""
    from dataclasses import asdict

    return {"prompts_file": cfg.prompts_file, "max_new_tokens": cfg.max_new_tokens,
            "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt,
            "sampling": asdict(cfg.sampling), "model": asdict(cfg.model), "schedule": asdict(cfg.schedule),
            "parallel": {"tensor_parallel_size": cfg.parallel.tensor_parallel_size,
                         "pipeline_parallel_size": cfg.parallel.pipeline_parallel_size,
                         "layers_per_stage": cfg.parallel.layers_per_stage},
            "runner": cfg.eval.runner, **_decoder_fingerprint(cfg)}


def _decoder_fingerprint(cfg: Any) -> dict:
    """The draft settings where a draft decodes, prompt lookup's where HF prompt lookup does."""
    from dataclasses import asdict

    from spd_megatron.schedule import get_schedule_class

    if cfg.eval.runner == "hf_prompt_lookup":
        return {"prompt_lookup": [cfg.eval.prompt_lookup_num_tokens, cfg.eval.prompt_lookup_max_ngram]}
    if cfg.eval.runner == "schedule" and get_schedule_class(cfg.schedule.name).has_draft:
        return {"draft": asdict(cfg.draft)}
    return {}
