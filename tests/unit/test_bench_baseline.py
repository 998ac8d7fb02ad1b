"""Pure helpers of tools/bench_baseline.py: percentiles, aggregation, the JSON summary (no timing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "bench_baseline.py"
_spec = importlib.util.spec_from_file_location("bench_baseline", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _prompt(new_tokens, decode_s, prefill_s=0.5, compute_s=0.0, wait_s=0.0):
    return {"new_tokens": new_tokens, "decode_seconds": decode_s, "prefill_seconds": prefill_s,
            "stage_compute_seconds": compute_s, "comm_wait_seconds": wait_s, "output_ids": [1] * new_tokens}


def _sample(tok_s, compute_s=0.0, wait_s=0.0, rep=0):
    # 2 prompts of 11 tokens -> 20 decode tokens over 20 / tok_s seconds
    per_prompt = [_prompt(11, 10 / tok_s, compute_s=compute_s / 2, wait_s=wait_s / 2) for _ in range(2)]
    return dict(bench.aggregate_prompts(per_prompt), repeat=rep, per_prompt=per_prompt)


def test_percentile_matches_linear_interpolation():
    xs = [5, 1, 4, 2, 3]
    assert bench.percentile(xs, 0) == 1
    assert bench.percentile(xs, 100) == 5
    assert bench.median(xs) == 3
    assert bench.median([1, 2, 3, 4]) == pytest.approx(2.5)
    assert bench.percentile(list(range(101)), 90) == pytest.approx(90)
    assert bench.percentile([0, 10], 99) == pytest.approx(9.9)
    assert bench.percentile([7], 99) == 7


def test_aggregate_prompts_excludes_first_token_like_decode_stats():
    agg = bench.aggregate_prompts([_prompt(11, 1.0), _prompt(21, 3.0), _prompt(1, 0.0)])
    assert agg["new_tokens"] == 33
    assert agg["decode_tokens"] == 30  # 10 + 20 + 0
    assert agg["decode_tokens_per_s"] == pytest.approx(7.5)
    assert agg["ms_per_token"] == pytest.approx(1000 / 7.5)
    assert bench.aggregate_prompts([_prompt(1, 0.0)])["decode_tokens_per_s"] == 0.0


def test_summarize_config_takes_medians_over_repeats():
    summary = bench.summarize_config([_sample(10.0), _sample(20.0, rep=1), _sample(12.0, rep=2)])
    assert summary["decode_tokens_per_s"] == pytest.approx(12.0)
    assert (summary["tok_s_min"], summary["tok_s_max"], summary["repeats"]) == (10.0, 20.0, 3)


def test_build_summary_overhead_split_and_latency():
    samples = {"hf_t1": [_sample(20.0), _sample(20.0, rep=1)],
               "ours_pp1": [_sample(10.0, compute_s=1.5), _sample(10.0, compute_s=1.5, rep=1)],
               "ours_pp2": [_sample(10.0, compute_s=1.0, wait_s=1.0)]}
    summary = bench.build_summary(samples, {"raw_send_recv": [2e-4, 4e-4, 6e-4]})
    assert summary["overhead"]["overhead_ms_per_token"] == pytest.approx(100.0 - 50.0)
    assert summary["overhead"]["overhead_ratio"] == pytest.approx(2.0)
    split = summary["ours_pp2_rank0_split"]  # 20 decode tokens, 2 s decode, 1 s wait, 1 s compute
    assert split["decode_ms"] == pytest.approx(100.0)
    assert split["comm_wait_ms"] == pytest.approx(50.0)
    assert split["not_waiting_ms"] == pytest.approx(50.0)
    assert split["compute_ms_hi"] == pytest.approx(50.0)
    assert split["compute_ms_lo"] == pytest.approx(0.0)  # 1 s compute - 1 s prefill
    assert split["comm_wait_fraction"] == pytest.approx(0.5)
    lat = summary["p2p"]["raw_send_recv"]
    assert lat["one_way_us_median"] == pytest.approx(200.0)
    assert lat["rtt_us_median"] == pytest.approx(400.0)
    json.dumps(summary)  # the summary goes into the JSON file as is


def test_overhead_needs_both_configs_and_order_is_interleaved():
    assert bench.overhead_summary({"ours_pp1": {"ms_per_token": 1.0}}) == {}
    assert bench.interleaved_order(["a", "b"], 2) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_token_agreement_counts_identical_prompts():
    hf, same, other = _sample(10.0), _sample(10.0), _sample(10.0)
    other["per_prompt"][1] = dict(other["per_prompt"][1], output_ids=[2])
    agreement = bench.token_agreement({"hf_t1": [hf], "ours_pp1": [same], "ours_pp2": [other]})
    assert agreement == {"ours_pp1": 2, "ours_pp2": 1}


def test_parse_args_quick_and_configs():
    args = bench.parse_args(["--quick", "--configs", "hf_t1,ours_pp2"])
    assert (args.prompts_limit, args.max_new_tokens, args.repeats) == (1, 24, 1)
    assert args.configs == ["hf_t1", "ours_pp2"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])


def test_cpu_seconds_reads_machine_and_own_cpu():
    busy, own = bench.cpu_seconds()
    assert busy > 0 and own > 0


def test_measured_reruns_a_disturbed_run_then_keeps_the_clean_one(monkeypatch):
    class FakeClock:  # every perf_counter() call advances 1 s
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

    # (machine busy s, own s) before/after each try: try 1 sees 1 core of others, try 2 none
    readings = iter([(0.0, 0.0), (2.0, 1.0), (10.0, 5.0), (11.0, 6.0)])
    monkeypatch.setattr(bench, "time", FakeClock())
    monkeypatch.setattr(bench, "cpu_seconds", lambda: next(readings))
    calls = []
    args = bench.parse_args(["--idle-wait", "0", "--retries", "2", "--max-other-cores", "0.25"])
    result, notes = bench.measured(lambda: calls.append(1) or "ok", args)
    assert result == "ok" and len(calls) == 2
    assert notes["rejected_tries_other_cpu_cores"] == [pytest.approx(1.0)]
    assert notes["other_cpu_cores"] == 0.0 and notes["idle_wait_seconds"] == 0.0


def test_config_names_parse_and_ratios_compare_the_same_threads():
    assert bench.parse_config("hf_t2") == {"kind": "hf", "pp": 1, "threads": 2, "spec": "", "compiled": False}
    assert bench.parse_config("ours_pp2_t1_local_compiled") == {
        "kind": "ours", "pp": 2, "threads": 1, "spec": "local", "compiled": True}
    assert bench.parse_config("ours_pp1")["threads"] == 1 and "2 threads" in bench.label("ours_pp1_t2")
    with pytest.raises(ValueError, match="unknown config 'ours_t2'"):
        bench.parse_config("ours_t2")
    summaries = {"hf_t1": {"decode_tokens_per_s": 10.0}, "hf_t2": {"decode_tokens_per_s": 20.0},
                 "ours_pp1": {"decode_tokens_per_s": 12.0}, "ours_pp1_t2": {"decode_tokens_per_s": 10.0},
                 "ours_pp2": {"decode_tokens_per_s": 10.0}, "ours_pp1_t4": {"decode_tokens_per_s": 1.0}}
    assert bench.ratios_vs_hf(summaries) == {"ours_pp1": pytest.approx(1.2), "ours_pp1_t2": pytest.approx(0.5),
                                             "ours_pp2": pytest.approx(0.5)}  # no hf_t4: no ratio
