"""Self-distillation data: the target answers the training prompts itself (issue 4 item 6).

Each conversation keeps its system message and first user turn; the assistant turn is replaced
by the target's own reply (greedy or sampled), generated in left-padded batches with Hugging Face
``generate`` on the same weights. The result is a JSONL of ``messages`` records that the normal
data path (``data.load_examples``) reads, so training on it changes nothing else. Resumable: the
file is appended to and records already written are skipped.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from spd_megatron.draft.training.data import iter_records, render, to_messages


def first_turn(messages: list[dict]) -> Optional[list[dict]]:
    """System message(s) and the first user turn: the prompt the target answers."""
    out = []
    for message in messages:
        out.append(message)
        if message["role"] == "user":
            return out
    return None


def iter_prompts(source: str) -> Iterator[list[dict]]:
    """First-turn prompts of the usable conversations (malformed records are skipped)."""
    for record in iter_records(source):
        messages = to_messages(record)
        prompt = first_turn(messages) if messages else None
        if prompt is not None:
            yield prompt


def load_hf_target(hf_dir: Path):
    """The target as a Hugging Face model (fp32, eval, on the GPU if there is one) and its
    tokenizer with left padding."""
    from transformers import AutoTokenizer

    from spd_megatron.eval.hf_generate import load_hf

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_hf(str(hf_dir)), tokenizer


@torch.no_grad()
def answer_batch(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, mode: str,
                 seed: int) -> list[str]:
    """The target's replies to a batch of chat prompts."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # [B, P]
    enc = enc.to(model.device)
    torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=mode == "sample",
                         temperature=1.0 if mode == "sample" else None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id)  # [B, P + new]
    new = out[:, enc["input_ids"].shape[1]:]  # [B, new]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def regenerate(source: str, out_file: Path, hf_dir: Path, limit: int, mode: str = "greedy",
               batch_size: int = 16, max_prompt: int = 256, max_new_tokens: int = 256,
               seed: int = 0, deadline: Optional[float] = None, shard: tuple[int, int] = (0, 1),
               progress: bool = True, skip: int = 0) -> bool:
    """Write (or complete) ``out_file``: one ``{"messages": [...]}`` record per prompt of at most
    ``max_prompt`` tokens, up to ``limit`` of them (0 = all) after the first ``skip``. With
    ``shard=(i, k)`` only prompts i, i + k, i + 2k, ... (one data-parallel rank's share;
    ``merge_shards`` restores the order).
    Stops between batches once ``time.monotonic()`` passes ``deadline``; returns whether the file
    is complete."""
    from tqdm.auto import tqdm

    model, tokenizer = load_hf_target(hf_dir)
    done = _count_lines(out_file)
    fits = (p for p in iter_prompts(source) if len(render(tokenizer, p, generation_prompt=True)) <= max_prompt)
    index, count = shard
    prompts = list(itertools.islice(fits, skip, skip + limit if limit else None))[index::count]
    todo = prompts[done:]
    bar = tqdm(total=len(prompts), initial=done, desc=f"self-distill ({mode})", unit="conv", disable=not progress)
    with out_file.open("a") as f:
        for i in range(0, len(todo), batch_size):
            if deadline is not None and time.monotonic() > deadline:
                bar.close()
                return False
            batch = todo[i:i + batch_size]
            replies = answer_batch(model, tokenizer, batch, max_new_tokens, mode, seed + done + i)
            for prompt, reply in zip(batch, replies):
                f.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": reply}]}) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return True


def merge_shards(shards: list[Path], out_file: Path) -> int:
    """Interleave the shard files of ``regenerate(shard=(i, k))`` back into the prompts' order
    (written to a temporary file and renamed, so ``out_file`` is never partial); returns the count."""
    parts = [path.read_text().splitlines(keepends=True) for path in shards]
    lines = [line for group in itertools.zip_longest(*parts) for line in group if line is not None]
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out_file)
    return len(lines)


def _count_lines(path: Path) -> int:
    """Complete records already written (a torn last line is dropped and regenerated)."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    if len(complete) != len(lines):
        path.write_text("".join(complete))
    return len(complete)
