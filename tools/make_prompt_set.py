#!/usr/bin/env python
"""An EAGLE-format prompt set from ShareGPT conversations that draft training never reads.

    python tools/make_prompt_set.py --start 15000 --count 16 --out runs/sharegpt_unseen.jsonl

Training reads the first ``train.limit`` usable conversations of the same stream (a few thousand at
most), so prompts from ``--start`` on are unseen by every shipped draft. Keeps first user turns of
10-600 characters that are mostly ASCII (SmolLM2 answers in English), one per conversation; the
file feeds ``prompts_file=``, ``tools/alpha_curve.py --sets`` and ``tools/bench_spd.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spd_megatron.draft.training.data import iter_records, to_messages


def usable_prompt(messages: list[dict], max_chars: int) -> str | None:
    """The first user turn when it is a short, mostly-ASCII question."""
    first = messages[0]["content"].strip() if messages and messages[0]["role"] == "user" else ""
    if not 10 <= len(first) <= max_chars:
        return None
    return first if sum(c.isascii() for c in first) >= 0.95 * len(first) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sharegpt", help="train.data's source (default: the package)")
    parser.add_argument("--start", type=int, default=15000, help="first record to read (records before are skipped)")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for index, record in enumerate(iter_records(args.data)):
        if index < args.start:
            continue
        prompt = usable_prompt(to_messages(record) or [], args.max_chars)
        if prompt is not None:
            rows.append({"question_id": index, "category": "sharegpt", "turns": [prompt]})
        if len(rows) == args.count:
            break
    if len(rows) < args.count:
        raise SystemExit(f"error: only {len(rows)} usable prompts from record {args.start} on; lower --start")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} prompts (records {rows[0]['question_id']}-{rows[-1]['question_id']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
