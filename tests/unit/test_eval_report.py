"""tools/eval.py's pieces without processes: record schema, metric arithmetic, resume file, summary,
subprocess errors, baseline configs, plots, and HF generate / prompt lookup on a tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from spd_megatron.config import load_config
from spd_megatron.errors import SPDError
from spd_megatron.eval.measure import RunInfo
from spd_megatron.eval.orchestrate import baseline_config, run_subprocess, write_config
from spd_megatron.eval.prompts import read_prompt_set
from spd_megatron.eval.records import RECORD_KEYS, ResultsFile, make_record
from spd_megatron.eval.summary import build_summary, speedup, summarize_config
from spd_megatron.metrics import DecodeStats

# (accepted, fill) per verification: 5 of 8 accepted; position 0: 2/2, position 1: 3/6
SCRIPT = [(True, 1), (True, 1), (False, 1), (True, 0), (True, 1), (False, 1), (True, 0), (False, 1)]


def scripted_stats(script=SCRIPT, new_tokens=9, cycles=12, depth=2, prefill_s=0.5, decode_s=2.0) -> dict:
    stats = DecodeStats(prompt_tokens=10, new_tokens=new_tokens, cycles=cycles, pipeline_depth=depth,
                        prefill_seconds=prefill_s, decode_seconds=decode_s, stop_reason="length")
    for accepted, fill in script:
        stats.observe_verdict(accepted, fill)
    return stats.to_dict()


def record(pid="q1", config="spd", output=(1, 2, 3), **kwargs) -> dict:
    return make_record(config, pid, f"prompt {pid}", list(output), "text", scripted_stats(**kwargs))


def test_record_schema_and_per_sample_metrics():
    r = json.loads(json.dumps(record()))  # what a reader of the JSONL sees
    assert tuple(r) == RECORD_KEYS
    assert r["alpha"] == pytest.approx(5 / 8)
    assert r["acceptance_by_position"] == {"0": 1.0, "1": 0.5}
    assert r["tokens_per_cycle"] == pytest.approx(8 / 12)  # decode tokens = new - 1
    assert r["E"] == pytest.approx(2 * 8 / 12)
    assert r["decode_tokens_per_s"] == pytest.approx(4.0)
    assert r["prefill_tokens_per_s"] == pytest.approx(20.0)
    assert r["stop_reason"] == "length" and r["prompt_tokens"] == 10 and r["new_tokens"] == 9


def test_autoregressive_and_hf_records_have_no_alpha():
    ar = make_record("ar_pp1", "q", "p", [1], "t", scripted_stats(script=[], new_tokens=5, cycles=4, depth=1))
    assert ar["alpha"] is None and ar["acceptance_by_position"] == {}
    assert ar["tokens_per_cycle"] == 1.0 and ar["E"] == 1.0
    hf = {"prompt_tokens": 4, "new_tokens": 6, "decode_tokens": 3, "prefill_seconds": 1.0, "decode_seconds": 1.5,
          "cycles": 2, "pipeline_depth": 1, "verified": 6, "accepted": 3, "stop_reason": "eos"}
    r = make_record("hf_prompt_lookup", "q", "p", [1] * 6, "t", hf)
    assert r["decode_tokens_per_s"] == pytest.approx(2.0)  # 3 tokens after the first forward's 3
    assert r["tokens_per_cycle"] == pytest.approx(1.5) and r["alpha"] == pytest.approx(0.5)


def test_summary_pools_counters_and_averages_samples():
    a = record("a")  # 5/8 accepted, 8 tokens / 12 cycles, 2 s decode
    b = record("b", script=[(True, 1)] * 4, new_tokens=5, cycles=5, decode_s=1.0)  # 4/4, 4 tokens / 5 cycles
    s = summarize_config([a, b])
    assert s["alpha"]["pooled"] == pytest.approx(9 / 12)
    assert s["alpha"]["mean"] == pytest.approx((5 / 8 + 1) / 2)
    assert s["tokens_per_cycle"]["pooled"] == pytest.approx(12 / 17)
    assert s["tokens_per_cycle"]["mean"] == pytest.approx((8 / 12 + 4 / 5) / 2)
    assert s["E"]["pooled"] == pytest.approx(2 * 12 / 17)
    assert s["acceptance_by_position"]["pooled"] == {"0": 1.0, "1": pytest.approx(7 / 10)}
    assert s["acceptance_by_position"]["mean"]["1"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["decode_tokens_per_s"]["pooled"] == pytest.approx(12 / 3.0)
    assert s["decode_tokens_per_s"]["mean"] == pytest.approx((4.0 + 4.0) / 2)
    assert s["prefill_tokens_per_s"]["pooled"] == pytest.approx(20 / 1.0)
    assert s["end_to_end_tokens_per_s"] == pytest.approx(14 / 4.0)
    assert s["phase_ms_per_token"]["decode"] == pytest.approx(1000 * 3.0 / 12)
    assert s["stop_reasons"] == {"length": 2}


def test_speedup_uses_common_prompts_and_counts_same_outputs():
    main = [record("a"), record("b", decode_s=1.0)]
    base = [record("a", decode_s=4.0, output=(9,)), record("c", decode_s=100.0)]
    sp = speedup(main, base)
    assert sp["prompts"] == 1 and sp["same_output"] == 0
    assert sp["decode"] == pytest.approx(2.0)  # 8 tokens in 2 s vs in 4 s
    assert sp["end_to_end"] == pytest.approx(4.5 / 2.5)
    summary = build_summary("spd", {"spd": main, "ar_pp1": base, "hf_generate": []}, {"max_new_tokens": 8},
                            {"hf_generate": "hf_generate: failed"})
    assert set(summary) == {"main", "max_new_tokens", "configs", "speedup", "errors"}
    assert set(summary["configs"]) == {"spd", "ar_pp1"} and set(summary["speedup"]) == {"ar_pp1"}
    json.dumps(summary)


def test_results_file_resumes_and_refuses_another_setup(tmp_path):
    results = ResultsFile(tmp_path, "spd")
    results.open({"max_new_tokens": 8}, {"session": 1})
    results.append(record("a"))
    results.append(record("b"))
    with open(results.path, "a") as f:
        f.write('{"id": "c", "tor')  # a run killed mid-line
    assert results.done_ids() == {"a", "b"}
    results.open({"max_new_tokens": 8}, {"session": 2})
    assert [s["session"] for s in results.meta()["sessions"]] == [1, 2]
    with pytest.raises(SPDError, match="max_new_tokens=8.*has 16") as err:
        results.open({"max_new_tokens": 16}, {})
    assert "\n" not in str(err.value)


def test_prompt_set_ids(tmp_path):
    assert [p.id for p in read_prompt_set("mt_bench", 2)] == ["81", "82"]
    file = tmp_path / "p.jsonl"
    file.write_text('{"turns": ["x"]}\n{"question_id": 7, "turns": ["y"]}\n{"question_id": 7, "turns": ["z"]}\n')
    assert [p.id for p in read_prompt_set(str(file), 2)] == ["line1", "7"]
    with pytest.raises(SPDError, match="question_id 7 appears twice"):
        read_prompt_set(str(file))


def test_subprocess_failure_and_timeout_are_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    fail = [sys.executable, "-c", "import sys; print('error: no such checkpoint'); sys.exit(2)"]
    error = run_subprocess("ar_pp1", fail, tmp_path / "fail.log", 30, env)
    assert error.startswith("ar_pp1: failed (exit 2): error: no such checkpoint") and "\n" not in error
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    error = run_subprocess("hf_generate", hang, tmp_path / "hang.log", 0.5, env)
    assert error.startswith("hf_generate: timed out after 0 s") and "\n" not in error
    assert run_subprocess("ok", [sys.executable, "-c", "pass"], tmp_path / "ok.log", 30, env) is None


def test_baseline_configs_keep_prompts_and_change_only_the_decoder(tmp_path):
    cfg = load_config("eval", ["schedule.name=spd", "parallel.layers_per_stage=[10,10,10]",
                               "max_new_tokens=32", "sampling.temperature=1", "draft.path=/d",
                               "eval.baselines=[ar_pp1,ar_same_pp,hf_prompt_lookup]"])
    info = RunInfo("spd", 3, 1, 3, 1, 5)
    ar1, same, lookup = (baseline_config(cfg, n, info, 3) for n in cfg.eval.baselines)
    for b in (ar1, same, lookup):
        assert (b.max_new_tokens, b.prompts_file, b.sampling) == (32, "mt_bench", cfg.sampling)
        assert b.schedule.name == "autoregressive" and b.draft.path == "" and b.eval.is_worker
        assert b.eval.baselines == []
    assert (ar1.parallel.pipeline_parallel_size, ar1.parallel.layers_per_stage) == (1, [])
    assert (same.parallel.pipeline_parallel_size, same.parallel.layers_per_stage) == (3, [10, 10, 10])
    assert (lookup.eval.runner, lookup.eval.name, lookup.eval.threads) == ("hf_prompt_lookup", "hf_prompt_lookup", 3)
    assert ar1.parallel.threads_per_rank == lookup.parallel.threads_per_rank == 3  # the baselines' thread rule
    assert load_config(str(write_config(same, tmp_path / "same.yaml"))) == same  # the file is the config


def test_plots_are_written(tmp_path):
    from spd_megatron.eval.plots import write_plots

    ar = make_record("ar_pp1", "a", "p", [1], "t", scripted_stats(script=[], depth=1))
    summary = build_summary("spd", {"spd": [record("a")], "ar_pp1": [ar]}, {}, {})
    written = write_plots(summary, tmp_path)
    assert [p.name for p in written] == ["acceptance_by_position.png", "phase_breakdown.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_hf_generate_and_prompt_lookup_agree_greedily(tiny_models):
    from spd_megatron.eval.hf_generate import generation_config, hf_generate, load_hf

    model = load_hf(str(tiny_models["llama"][0]))
    ids = [65, 66, 67, 68, 65, 66, 67, 68, 65, 66]
    plain = hf_generate(model, ids, 12, generation_config(model, 12, eos_token_ids=[258]))
    lookup = hf_generate(model, ids, 12, generation_config(model, 12, eos_token_ids=[258], prompt_lookup=4))
    assert plain["output_ids"] == lookup["output_ids"]  # prompt lookup is lossless under greedy
    assert plain["verified"] == 0 and plain["cycles"] == plain["new_tokens"] - 1
    assert lookup["cycles"] <= plain["cycles"] and lookup["accepted"] <= lookup["verified"]
    assert lookup["verified"] > 0  # the repeated prompt gives the lookup n-grams to propose from
    assert plain["stop_reason"] == ("eos" if plain["output_ids"][-1] == 258 else "length")
    sampled = [hf_generate(model, ids, 8, generation_config(model, 8, temperature=1.0), seed=3)["output_ids"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_hf_runner_writes_records_and_resumes(tiny_models, tmp_path):
    from spd_megatron.eval.measure import run_hf_eval

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question_id": 1, "turns": ["ab ab ab"]}\n{"question_id": 2, "turns": ["cd"]}\n')
    overrides = [f"model.checkpoint={tiny_models['llama'][1]}", f"prompts_file={prompts}", "max_new_tokens=5",
                 f"eval.out={tmp_path / 'out'}", "eval.runner=hf_prompt_lookup", "eval.threads=1"]
    cfg = load_config("tiny", overrides)
    assert run_hf_eval(cfg).decoded == 2
    records = ResultsFile(cfg.eval.out, "hf_prompt_lookup").read()
    assert [r["id"] for r in records] == ["1", "2"] and all(tuple(r) == RECORD_KEYS for r in records)
    assert (tmp_path / "out" / "hf_model" / "config.json").is_file()  # the checkpoint, converted back once
    assert run_hf_eval(cfg).decoded == 0
