#!/usr/bin/env python
"""An EAGLE-format prompt set from ShareGPT conversations that draft training never reads.

    python tools/make_prompt_set.py --start 15000 --count 16 --out runs/sharegpt_unseen.jsonl

Training reads the first ``train.skip + train.limit`` usable conversations of the same stream
(self-distillation's 4000th prompt is record 5004), so prompts from ``--start`` on are unseen by
every shipped draft. Keeps first user turns of 10-600 characters that are mostly ASCII (SmolLM2
answers in English), one per conversation; the file feeds ``prompts_file=``,
``tools/alpha_curve.py --sets`` and ``tools/bench_spd.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from spd_megatron.draft.training.data import iter_records, to_messages
from spd_megatron.draft.training.regenerate import first_turn


def usable_prompt(record, max_chars: int) -> str | None:
    """The record's first user turn (what self-distillation answers) when short and mostly ASCII."""
    messages = to_messages(record)
    turn = first_turn(messages) if messages else None
    text = turn[-1]["content"].strip() if turn else ""
    if not 10 <= len(text) <= max_chars:
        return None
    return text if sum(c.isascii() for c in text) >= 0.95 * len(text) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sharegpt", help="train.data's source (default: the package)")
    parser.add_argument("--start", type=int, default=15000, help="first record to read (records before are skipped)")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for index, record in enumerate(itertools.islice(iter_records(args.data), args.start, None), start=args.start):
        prompt = usable_prompt(record, args.max_chars)
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
