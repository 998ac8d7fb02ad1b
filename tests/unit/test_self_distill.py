"""Self-distillation data: batched left-padded replies equal one-by-one greedy decoding; resumable."""

from __future__ import annotations

import json

import torch

from spd_megatron.draft.training.regenerate import first_turn, load_hf_target, merge_shards, regenerate

CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to five please"},
                  {"role": "assistant", "content": "1 2 3 4 5"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "1 2 3 4 5"}]},
    {"messages": [{"role": "assistant", "content": "no user turn"}]},  # malformed: skipped
    {"messages": [{"role": "user", "content": "a longer question about the weather today"},
                  {"role": "assistant", "content": "sunny"}]},
]


def _greedy_alone(model, tokenizer, prompt, new_tokens):
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, P]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_first_turn_keeps_system_and_first_user_message():
    messages = CONVERSATIONS[1]["messages"]
    assert first_turn(messages) == messages[:2]
    assert first_turn([{"role": "assistant", "content": "x"}]) is None


def test_batched_replies_equal_greedy_decoding_and_resume_appends(tiny_models, tmp_path):
    hf_dir = tiny_models["llama"][0]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    out = tmp_path / "self_distill.jsonl"
    assert not regenerate(str(data), out, hf_dir, limit=2, batch_size=2, max_prompt=200, max_new_tokens=6,
                          deadline=0.0)  # the time budget is spent before the first batch
    assert not out.exists() or out.read_text() == ""
    assert regenerate(str(data), out, hf_dir, limit=2, batch_size=2, max_prompt=200, max_new_tokens=6)
    first = out.read_text().splitlines()
    assert len(first) == 2
    with out.open("a") as f:
        f.write('{"messages": [')  # a torn record, as after a crash mid-write
    regenerate(str(data), out, hf_dir, limit=3, batch_size=2, max_prompt=200, max_new_tokens=6)
    lines = out.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    model, tokenizer = load_hf_target(hf_dir)
    questions = ["hi", "count to five please", "a longer question about the weather today"]
    for line, question in zip(lines, questions):
        messages = json.loads(line)["messages"]
        assert [m["role"] for m in messages[-2:]] == ["user", "assistant"]
        assert messages[-2]["content"] == question
        assert messages[-1]["content"] == _greedy_alone(model, tokenizer, messages[:-1], 6)


def test_shards_merge_into_the_one_process_file(tiny_models, tmp_path):
    hf_dir = tiny_models["llama"][0]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    whole = tmp_path / "whole.jsonl"
    assert regenerate(str(data), whole, hf_dir, limit=3, batch_size=3, max_prompt=200, max_new_tokens=6)
    shards = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, shard in enumerate(shards):
        assert regenerate(str(data), shard, hf_dir, limit=3, batch_size=2, max_prompt=200, max_new_tokens=6,
                          shard=(i, 2), progress=False)
    assert [len(s.read_text().splitlines()) for s in shards] == [2, 1]  # prompts 0, 2 and 1
    merged = tmp_path / "merged.jsonl"
    assert merge_shards(shards, merged) == 3
    assert merged.read_text() == whole.read_text()
    later = tmp_path / "later.jsonl"  # train.skip: the prompts after the first usable one
    assert regenerate(str(data), later, hf_dir, limit=2, batch_size=2, max_prompt=200, max_new_tokens=6, skip=1)
    assert later.read_text().splitlines() == whole.read_text().splitlines()[1:]


def test_hf_folder_exports_a_checkpoint_once(tiny_models, tmp_path):
    from types import SimpleNamespace

    from spd_megatron.convert.pipeline import hf_folder

    model_cfg = SimpleNamespace(checkpoint=str(tiny_models["llama"][1]), builtin="", cache_dir="")
    folder = hf_folder(model_cfg, tiny_models["llama"][1], tmp_path / "hf")
    assert folder == tmp_path / "hf" and (folder / "config.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert hf_folder(model_cfg, tiny_models["llama"][1], folder) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not exported again
    model, tokenizer = load_hf_target(folder)
    assert tokenizer.padding_side == "left" and model.config.num_hidden_layers > 0
