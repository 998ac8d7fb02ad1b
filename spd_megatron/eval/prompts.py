"""Prompts: one user message, or an EAGLE-format jsonl file; and the chat-template encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spd_megatron.errors import SPDError

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then give one fun fact about it."


BUILTIN_PROMPT_SETS = {p.stem: p for p in (Path(__file__).parent.parent / "data").glob("*.jsonl")}


def resolve_prompts_file(path: str) -> Path:
    """A jsonl path, or the name of a prompt set shipped with the package (mt_bench, humaneval, handwritten)."""
    file = Path(path)
    if file.is_file():
        return file
    if path in BUILTIN_PROMPT_SETS:
        return BUILTIN_PROMPT_SETS[path]
    raise SPDError(f"prompts_file {path} does not exist (builtin sets: {', '.join(sorted(BUILTIN_PROMPT_SETS))})")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a set: its id (``question_id``, else the line number) and first user turn."""

    id: str
    text: str


def read_prompts_file(path: str, limit: int = 0) -> list[str]:
    """First turns of an EAGLE-format jsonl (``{"question_id", "turns": [...]}`` per line).

    Raises:
        SPDError: missing file, or a malformed line (the line number is named).
    """
    return [item.text for item in _read_items(path, limit)]


def read_prompt_set(path: str, limit: int = 0) -> list[PromptItem]:
    """Like read_prompts_file, with each prompt's id (ids must be unique: eval resumes by id).

    Raises:
        SPDError: missing file, a malformed line, no prompts, or a repeated id.
    """
    items = _read_items(path, limit)
    seen = set()
    for item in items:
        if item.id in seen:
            raise SPDError(f"{path}: question_id {item.id} appears twice; eval needs unique ids")
        seen.add(item.id)
    return items


def _read_items(path: str, limit: int) -> list[PromptItem]:
    file = resolve_prompts_file(path)
    items = []
    for lineno, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        items.append(_parse_line(line, path, lineno))
        if limit and len(items) >= limit:
            break
    if not items:
        raise SPDError(f"prompts_file {path} has no prompts")
    return items


def _parse_line(line: str, path: str, lineno: int) -> PromptItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SPDError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one JSON object per line") from None
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise SPDError(f'{path}:{lineno}: expected {{"turns": ["first user message", ...]}}')
    return PromptItem(str(record.get("question_id", f"line{lineno}")), turns[0])


def encode_prompt(tokenizer: Any, text: str, chat_template: bool = True,
                  system_prompt: Optional[str] = None) -> list[int]:
    """Token ids fed to the model: the user message in the chat template, or the raw text."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(text)["input_ids"])
    messages = [{"role": "user", "content": text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]
