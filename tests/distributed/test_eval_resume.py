"""tools/eval.py's measurement on 2 gloo ranks with scripted drafts: known accepts and rejects give
known alpha, tokens per cycle and E in the JSONL; a rerun decodes only the prompts not yet in it,
and a rerun with another setup in the same folder fails on every rank."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config
from multiproc import run_distributed

from spd_megatron.draft import AdversarialDraft, Draft, OracleDraft
from spd_megatron.errors import SPDError
from spd_megatron.eval.measure import run_schedule_eval
from spd_megatron.eval.prompts import encode_prompt, read_prompt_set
from spd_megatron.eval.records import RECORD_KEYS, ResultsFile
from spd_megatron.parallel.init import init_parallel
from spd_megatron.schedule.spd import SPDSchedule

NEW = 12


class ScriptedDraft(Draft):
    """Oracle (always right) or adversarial (always wrong) on whichever prompt is being decoded."""

    def __init__(self, references: dict, vocab_size: int, is_right: bool) -> None:
        self.references, self.vocab_size, self.is_right = references, vocab_size, is_right

    def start(self, prompt_rows) -> None:
        reference = self.references[tuple(row.token for row in prompt_rows)]
        self.inner = (OracleDraft if self.is_right else AdversarialDraft)(reference, self.vocab_size)

    def propose(self, ctx, params, generator):
        return self.inner.propose(ctx, params, generator)


class CountingSchedule:
    """Counts generate calls of the wrapped schedule (on every rank)."""

    def __init__(self, schedule) -> None:
        self.schedule, self.calls = schedule, 0
        self.generator = schedule.generator

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.schedule.generate(*args, **kwargs)


def scripted(cfg, is_right: bool, counters: list):
    """make_schedule for run_schedule_eval: SPD with a scripted draft; greedy references first."""
    def make(engine):
        references = {}
        for item in read_prompt_set(cfg.prompts_file, cfg.prompts_limit):
            ids = encode_prompt(engine.tokenizer, item.text)
            out = engine.schedule.generate(ids, NEW, engine.eos_token_ids).output_ids
            references[tuple(ids)] = ids + out
        draft = ScriptedDraft(references, engine.arch.vocab_size, is_right) if engine.stage.placement.is_first else None
        counters.append(CountingSchedule(SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling,
                                                     draft=draft)))
        return counters[-1]
    return make


def _check_metrics(records, n, is_right):
    for r in records:
        assert tuple(r) == RECORD_KEYS
        tokens, cycles = r["new_tokens"] - 1, r["stats"]["cycles"]
        assert r["tokens_per_cycle"] == pytest.approx(tokens / cycles) and r["E"] == pytest.approx(n * tokens / cycles)
        if is_right:  # warm-up n - 1 cycles, then one token per cycle
            assert r["alpha"] == 1.0 and cycles == tokens + n - 1
            assert set(r["acceptance_by_position"].values()) == {1.0}
        else:  # every token costs a refill of n cycles
            assert r["alpha"] == 0.0 and cycles == tokens * n and r["E"] == pytest.approx(1.0)
            assert set(r["acceptance_by_position"].values()) == {0.0}


def _worker(rank, world_size, ckpt, prompts, out):
    cfg = tiny_config(ckpt, prompts_file=prompts, max_new_tokens=NEW)
    cfg.schedule.name = "spd"
    ctx = init_parallel(cfg.parallel)
    for is_right, name in ((True, "oracle"), (False, "adversarial")):
        cfg.eval.out, cfg.eval.name = f"{out}/{name}", name
        run_schedule_eval(cfg, ctx, scripted(cfg, is_right, []))
        if rank == 0:
            _check_metrics(ResultsFile(cfg.eval.out, name).read(), world_size, is_right)
    # resume: 2 prompts, then all 3 (only the third is decoded: a warm-up and one run), then nothing
    cfg.eval.out, cfg.eval.name = f"{out}/resume", "spd"
    calls = []
    for limit in (2, 3, 3):
        cfg.prompts_limit = limit
        run_schedule_eval(cfg, ctx, scripted(cfg, True, calls))
    assert [c.calls for c in calls] == [3, 2, 0]
    cfg.max_new_tokens = NEW - 1  # another setup in the same folder: refused on every rank, no hang
    with pytest.raises(SPDError, match=f"measured with max_new_tokens={NEW}, this run has {NEW - 1}"):
        run_schedule_eval(cfg, ctx, scripted(cfg, True, calls))
    if rank == 0:
        records = ResultsFile(cfg.eval.out, "spd").read()
        assert [r["id"] for r in records] == ["p1", "p2", "p3"]
        assert [r["output_ids"] for r in records] == [r["output_ids"] for r in
                                                      ResultsFile(f"{out}/oracle", "oracle").read()]


@pytest.mark.distributed
def test_eval_metrics_on_scripted_drafts_and_resume(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": f"p{i}", "turns": [text]}) + "\n"
                               for i, text in enumerate(["hello there", "abc abc abc", "x y z w"], start=1)))
    run_distributed(_worker, 2, tiny_models["llama"][1], str(prompts), str(tmp_path), timeout_s=120)
