"""Training data: record parsing, assistant masks through the chat template, vocabulary mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer

from spd_megatron.draft.training.data import (
    DataStats,
    _salvage_json_array,
    encode,
    load_examples,
    split_examples,
    to_messages,
)
from spd_megatron.draft.training.vocab import build_draft_vocab

ROOT = Path(__file__).resolve().parents[2]


def test_sharegpt_and_messages_records():
    share = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}
    assert to_messages(share) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert to_messages({"messages": [{"role": "user", "content": "x"}]}) is None  # no assistant turn
    assert to_messages({"messages": [{"role": "user", "content": 3}]}) is None
    assert to_messages("garbage") is None


def test_truncated_json_salvage_keeps_complete_records():
    text = json.dumps([{"a": 1}, {"b": [1, 2]}]) [:-1] + ', {"c": "unterminat'
    assert list(_salvage_json_array(text)) == [{"a": 1}, {"b": [1, 2]}]


def test_assistant_mask_covers_exactly_the_assistant_replies():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]
    ex = encode(tok, messages, max_len=512)
    assert ex.ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    targets = tok.decode([t for t, a in zip(ex.ids, ex.assistant) if a])
    assert targets == "yo!<|im_end|>\nok<|im_end|>\n"  # replies and their end-of-turn, nothing else
    short = encode(tok, messages, max_len=20)
    assert len(short.ids) == len(short.assistant) == 20


def test_load_examples_counts_malformed_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"messages": [{"role": "user", "content": "hello there"},
                         {"role": "assistant", "content": "general kenobi, a long reply"}]}
    path.write_text("\n".join([json.dumps(good), "{broken", json.dumps({"x": 1}), json.dumps(good)]))
    stats = DataStats()
    examples = load_examples(str(path), byte_tokenizer(), max_len=256, limit=0, stats=stats)
    assert len(examples) == 2 and stats.records == 4 and sum(stats.skipped.values()) == 2
    train, held = split_examples(examples, 1, seed=0)
    assert len(train) == len(held) == 1
    later = load_examples(str(path), byte_tokenizer(), max_len=256, limit=0, skip=1)
    assert [ex.ids for ex in later] == [examples[1].ids]  # the first usable one passed over


def test_draft_vocab_round_trip():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "aaab"}]
    vocab = build_draft_vocab([encode(tok, messages, 64)], size=2, always=(258,))
    table = vocab.to_draft(260)
    assert vocab.token_ids == sorted(vocab.token_ids) and 258 in vocab.token_ids
    assert torch.equal(torch.tensor(vocab.token_ids)[table[torch.tensor(vocab.token_ids)]],
                       torch.tensor(vocab.token_ids))
    assert (table >= 0).sum() == len(vocab.token_ids) and 0 < vocab.coverage <= 1


def test_make_prompt_set_skips_the_training_range_and_keeps_short_ascii_first_turns(tmp_path):
    import importlib.util

    from spd_megatron.eval.prompts import read_prompt_set

    spec = importlib.util.spec_from_file_location("make_prompt_set", ROOT / "tools" / "make_prompt_set.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    conv = lambda text: {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}  # noqa: E731
    records = [conv("seen in training, long enough"), conv("x"), conv("日本語のプロンプトです、長いです"),
               conv("What is a tuple in Python?"), conv("Name three rivers in Europe."), conv("unused after the count")]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "set.jsonl"
    assert tool.main(["--data", str(data), "--start", "1", "--count", "2", "--out", str(out)]) == 0
    items = read_prompt_set(str(out))
    assert [(i.id, i.text) for i in items] == [("3", "What is a tuple in Python?"), ("4", "Name three rivers in Europe.")]
    with pytest.raises(SystemExit, match="only 3 usable prompts"):
        tool.main(["--data", str(data), "--start", "1", "--count", "4", "--out", str(out)])
    assert len(read_prompt_set("handwritten")) == 8  # the shipped hand-written set
