#!/usr/bin/env python
"""Baseline speed: HF ``generate`` vs our autoregressive schedule (PP=1, PP=2), plus p2p latency.

    python tools/bench_baseline.py [--quick] [--repeats R] [--max-new-tokens N] [--out DIR]

Runs, interleaved R times (A B C D A B C D ...) on the same prompts and max_new_tokens:
  hf_t1 / hf_t2   HF transformers ``generate`` (greedy, KV cache) in this process with
                  torch.set_num_threads(1 / 2); the model is loaded once.
  ours_pp<P>[_t<T>][_<spec>][_compiled]
                  ``torchrun --standalone --nproc-per-node P examples/decode.py`` with
                  schedule.name=autoregressive, OMP_NUM_THREADS=T per rank (default 1),
                  model.layer_spec=<spec> (default: the config's, lean on CPU) and model.compile=on
                  with _compiled; numbers come from its report.json (rank 0 = stage 0).
Then a 2-process gloo ping-pong through StageLink (tools/bench_p2p.py).

Decode tok/s is (new_tokens - 1) / (time after the first token) for both stacks, summed over
prompts. For HF, a streamer timestamps the first new token (``put`` after the prompt) and
``end``; our DecodeStats measures the same interval. Output: a rich table, a JSON file with
every raw sample and the medians, and a PNG bar chart next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from spd_megatron.eval.hf_generate import hf_generate, load_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_p2p  # noqa: E402 - the sibling tool (p2p latency)
from bench_p2p import latency_summary, percentile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "spd_megatron"
CONFIGS = ("hf_t1", "hf_t2", "ours_pp1", "ours_pp2")
CONFIG_RE = re.compile(r"^(?:hf_t(?P<hf_threads>\d+)|ours_pp(?P<pp>\d+)(?:_t(?P<threads>\d+))?"
                       r"(?:_(?P<spec>lean|local))?(?P<compiled>_compiled)?)$")
STAT_KEYS = ("decode_tokens_per_s", "ms_per_token", "new_tokens", "prefill_seconds", "decode_seconds",
             "stage_compute_seconds", "comm_wait_seconds")


# ---- pure helpers (unit-tested) ---------------------------------------------------------------
def parse_config(name: str) -> dict:
    """A config name -> {kind: hf | ours, pp, threads, spec ('' = the default), compiled}.

    Raises:
        ValueError: the name does not follow ``hf_t<T>`` or ``ours_pp<P>[_t<T>][_lean|_local][_compiled]``.
    """
    match = CONFIG_RE.match(name)
    if match is None:
        raise ValueError(f"unknown config '{name}'; use hf_t<T> or ours_pp<P>[_t<T>][_lean|_local][_compiled]")
    if match["hf_threads"]:
        return {"kind": "hf", "pp": 1, "threads": int(match["hf_threads"]), "spec": "", "compiled": False}
    return {"kind": "ours", "pp": int(match["pp"]), "threads": int(match["threads"] or 1),
            "spec": match["spec"] or "", "compiled": bool(match["compiled"])}


def label(name: str) -> str:
    """Human label of a config name, e.g. 'ours PP=1, 2 threads/rank, local spec'."""
    c = parse_config(name)
    threads = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
    if c["kind"] == "hf":
        return f"HF generate, {threads}"
    extra = "".join([f", {c['spec']} spec" if c["spec"] else "", ", compiled" if c["compiled"] else ""])
    return f"ours autoregressive PP={c['pp']}, {threads}/rank{extra}"


def ratios_vs_hf(summaries: dict) -> dict:
    """Decode tok/s of every ours config over HF's at the same total threads (PP x threads/rank)."""
    out = {}
    for name, s in summaries.items():
        c = parse_config(name)
        hf = summaries.get(f"hf_t{c['pp'] * c['threads']}")
        if c["kind"] == "ours" and hf and hf["decode_tokens_per_s"] > 0:
            out[name] = s["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    return out


def median(values) -> float:
    return percentile(values, 50.0)


def aggregate_prompts(per_prompt: list[dict]) -> dict:
    """One sample from per-prompt stats: totals, and decode tok/s over all decode time."""
    total = {k: sum(p.get(k, 0.0) for p in per_prompt)
             for k in ("new_tokens", "prefill_seconds", "decode_seconds", "stage_compute_seconds",
                       "comm_wait_seconds")}
    total["decode_tokens"] = sum(max(p["new_tokens"] - 1, 0) for p in per_prompt)
    tok_s = total["decode_tokens"] / total["decode_seconds"] if total["decode_seconds"] > 0 else 0.0
    total["decode_tokens_per_s"] = tok_s
    total["ms_per_token"] = 1000.0 / tok_s if tok_s > 0 else 0.0
    return total


def summarize_config(samples: list[dict]) -> dict:
    """Medians over repeats of every stat, plus the min/max decode tok/s."""
    out = {k: median([s[k] for s in samples]) for k in STAT_KEYS + ("decode_tokens",)}
    rates = [s["decode_tokens_per_s"] for s in samples]
    out.update(repeats=len(samples), tok_s_min=min(rates), tok_s_max=max(rates),
               other_cpu_cores_max=max(s.get("other_cpu_cores", 0.0) for s in samples))
    return out


def overhead_summary(summaries: dict) -> dict:
    """Per-token overhead of our stack over HF at the same parallelism (1 thread, 1 process)."""
    if "ours_pp1" not in summaries or "hf_t1" not in summaries:
        return {}
    ours, hf = summaries["ours_pp1"]["ms_per_token"], summaries["hf_t1"]["ms_per_token"]
    return {"ours_pp1_ms_per_token": ours, "hf_t1_ms_per_token": hf, "overhead_ms_per_token": ours - hf,
            "overhead_ratio": ours / hf if hf > 0 else float("nan")}


def rank0_split(summary: dict) -> dict:
    """Rank 0's decode time per token: comm wait, the rest, and stage compute bounds.

    ``stage_compute_seconds`` in the stats also counts the prefill forwards, so the decode-only
    compute lies between (stage compute - prefill seconds) and stage compute.
    """
    tokens = max(summary["decode_tokens"], 1)
    per_tok = {k: 1000.0 * summary[k] / tokens
               for k in ("decode_seconds", "comm_wait_seconds", "stage_compute_seconds", "prefill_seconds")}
    return {"decode_ms": per_tok["decode_seconds"], "comm_wait_ms": per_tok["comm_wait_seconds"],
            "not_waiting_ms": per_tok["decode_seconds"] - per_tok["comm_wait_seconds"],
            "compute_ms_hi": per_tok["stage_compute_seconds"],
            "compute_ms_lo": max(per_tok["stage_compute_seconds"] - per_tok["prefill_seconds"], 0.0),
            "comm_wait_fraction": summary["comm_wait_seconds"] / summary["decode_seconds"]
            if summary["decode_seconds"] > 0 else 0.0}


def build_summary(samples: dict, pingpong: dict) -> dict:
    """The JSON ``summary``: medians per config, overhead, PP=2 split, p2p latency."""
    summaries = {name: summarize_config(s) for name, s in samples.items() if s}
    out = {"configs": summaries, "overhead": overhead_summary(summaries),
           "speed_vs_hf_same_threads": ratios_vs_hf(summaries),
           "p2p": {mode: latency_summary(rtts) for mode, rtts in pingpong.items()}}
    for name in summaries:
        if name.startswith("ours"):
            out[f"{name}_rank0_split"] = rank0_split(summaries[name])
    return out


def interleaved_order(configs, repeats: int) -> list[tuple[str, int]]:
    """[(config, repeat)] as A B C D A B C D ..."""
    return [(c, r) for r in range(repeats) for c in configs]


# ---- HF generate ------------------------------------------------------------------------------
def run_hf(model, prompt_ids: list[list[int]], max_new_tokens: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    return [hf_generate(model, ids, max_new_tokens) for ids in prompt_ids]


# ---- our stack --------------------------------------------------------------------------------
def torchrun_cmd(nproc: int, script: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            script, *args]


def run_subprocess(cmd: list[str], log_file: Path, threads: int = 1) -> None:
    """Run a torchrun job with OMP_NUM_THREADS set; its output goes to ``log_file``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}); log {log_file}:\n{tail}")


def run_ours(config: dict, args, out_dir: Path, tag: str) -> list[dict]:
    """examples/decode.py for a parsed ours config; returns the per-prompt stats of its report (+ ids)."""
    report = out_dir / "raw" / f"{tag}.json"
    pp = config["pp"]
    overrides = [f"prompts_file={args.prompts}", f"prompts_limit={args.prompts_limit}",
                 f"max_new_tokens={args.max_new_tokens}", f"parallel.pipeline_parallel_size={pp}",
                 "schedule.name=autoregressive", "model.dtype=float32", "report.stream=false",
                 f"model.checkpoint={args.checkpoint}", f"report.json={report}"]
    overrides += [f"model.layer_spec={config['spec']}"] if config["spec"] else []
    overrides += ["model.compile=on"] if config["compiled"] else []
    run_subprocess(torchrun_cmd(pp, "examples/decode.py", overrides), out_dir / "logs" / f"{tag}.log",
                   threads=config["threads"])
    results = json.loads(report.read_text())["results"]
    return [dict(r["stats"], output_ids=r["output_ids"], prompt_ids=r["prompt_ids"]) for r in results]


# ---- machine, output ----------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_1min_start": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its finished children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:7])  # user nice system + irq softirq (not idle/iowait/steal)
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy / os.sysconf("SC_CLK_TCK"), own


def wait_for_idle(max_wait_s: float, max_other_cores: float = 0.15, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use < ``max_other_cores``; returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        (busy0, own0) = cpu_seconds()
        time.sleep(window_s)
        (busy1, own1) = cpu_seconds()
        if (busy1 - busy0 - (own1 - own0)) / window_s < max_other_cores:
            break
    return time.perf_counter() - start


def token_agreement(samples: dict) -> dict:
    """Do HF (1 thread) and ours (PP=1, PP=2) produce the same greedy tokens? (first repeat)"""
    if not samples.get("hf_t1"):
        return {}
    ref = [p["output_ids"] for p in samples["hf_t1"][0]["per_prompt"]]
    return {name: sum(a == p["output_ids"] for a, p in zip(ref, samples[name][0]["per_prompt"]))
            for name in samples if name != "hf_t1" and samples.get(name)}


def print_tables(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Decode speed (medians over repeats)")
    table.add_column("config", no_wrap=True)
    for col in ("decode tok/s", "min..max", "ms/tok", "new tok", "prefill s", "rank-0 comm wait ms/tok",
                "other procs' CPU (cores, max)"):
        table.add_column(col, justify="right")
    for name, s in summary["configs"].items():
        wait = 1000 * s["comm_wait_seconds"] / max(s["decode_tokens"], 1)
        table.add_row(label(name), f"{s['decode_tokens_per_s']:.2f}", f"{s['tok_s_min']:.2f}..{s['tok_s_max']:.2f}",
                      f"{s['ms_per_token']:.1f}", f"{s['new_tokens']:.0f}", f"{s['prefill_seconds']:.2f}",
                      f"{wait:.1f}" if name.startswith("ours") else "-", f"{s['other_cpu_cores_max']:.2f}")
    p2p = Table(title="p2p latency, 2 gloo ranks, [1,1,576] fp32 + 4-int64 header")
    for col in ("mode", "one-way median µs", "p90 µs", "p99 µs", "n"):
        p2p.add_column(col, justify="right")
    for mode, s in summary["p2p"].items():
        p2p.add_row(mode, f"{s['one_way_us_median']:.0f}", f"{s['one_way_us_p90']:.0f}",
                    f"{s['one_way_us_p99']:.0f}", str(s["n"]))
    console = Console(width=140)
    console.print(table, p2p)
    console.print_json(json.dumps({k: v for k, v in summary.items() if k not in ("configs", "p2p")}))


def plot_chart(samples: dict, summary: dict, path: Path) -> None:
    """Bars: median decode tok/s per config; dots: the raw repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["configs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    medians = [summary["configs"][n]["decode_tokens_per_s"] for n in names]
    colors = ["#999999" if n.startswith("hf") else "#1f77b4" for n in names]
    bars = ax.bar(range(len(names)), medians, color=colors)
    for i, n in enumerate(names):
        ax.plot([i] * len(samples[n]), [s["decode_tokens_per_s"] for s in samples[n]], "k.", ms=6)
    ax.bar_label(bars, fmt="%.1f", label_type="center", color="white", fontweight="bold")
    ax.set_xticks(range(len(names)), [label(n).replace(", ", "\n").replace(" PP", "\nPP") for n in names],
                  fontsize=7)
    ax.set_ylabel("decode tokens/s (greedy, batch 1)")
    ax.set_title("SmolLM2-135M-Instruct fp32, 2-core CPU: median (bars), repeats (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the benchmark ------------------------------------------------------------------------------
def encode_prompts(args) -> tuple[list[str], list[list[int]]]:
    from transformers import AutoTokenizer

    from spd_megatron.eval.prompts import encode_prompt, read_prompts_file

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    texts = read_prompts_file(args.prompts, args.prompts_limit)
    return texts, [encode_prompt(tokenizer, t) for t in texts]


def run_one(name: str, rep: int, args, out_dir: Path, model, prompt_ids) -> list[dict]:
    config = parse_config(name)
    if config["kind"] == "hf":
        return run_hf(model, prompt_ids, args.max_new_tokens, config["threads"])
    per_prompt = run_ours(config, args, out_dir, f"{name}_r{rep}")
    if [p.pop("prompt_ids") for p in per_prompt] != prompt_ids:
        raise RuntimeError(f"{name}: decode.py encoded the prompts differently from this script")
    return per_prompt


def measured(fn, args):
    """Run ``fn()`` on a quiet machine: wait for idle, and run again (up to ``args.retries`` times)
    while other processes used more than ``args.max_other_cores`` during the run.

    Returns:
        (fn's result, notes: wall seconds, idle wait, other processes' CPU cores, rejected tries).
    """
    rejected = []
    for attempt in range(args.retries + 1):
        waited = wait_for_idle(args.idle_wait) if args.idle_wait > 0 else 0.0
        (busy0, own0), t0 = cpu_seconds(), time.perf_counter()
        result = fn()
        (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t0
        other = max(busy1 - busy0 - (own1 - own0), 0.0) / wall
        if other <= args.max_other_cores or attempt == args.retries:
            return result, {"wall_seconds": wall, "idle_wait_seconds": waited, "other_cpu_cores": other,
                            "rejected_tries_other_cpu_cores": rejected}
        rejected.append(other)


def run_benchmark(args) -> dict:
    """Every config R times, interleaved; then the ping-pong; returns the JSON document."""
    from tqdm import tqdm

    out_dir = Path(args.out)
    for sub in ("raw", "logs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    meta = dict(machine_info(), argv=sys.argv, args=vars(args))
    print(f"1-min loadavg before start: {meta['loadavg_1min_start']:.2f} (nproc {meta['nproc']})", flush=True)
    texts, prompt_ids = encode_prompts(args)
    model = load_hf(args.hf) if any(c.startswith("hf") for c in args.configs) else None
    if model is not None:
        run_hf(model, prompt_ids[:1], 2, 1)  # warm-up: first-call allocations
    samples = {c: [] for c in args.configs}
    for name, rep in tqdm(interleaved_order(args.configs, args.repeats), desc="runs", unit="run"):
        per_prompt, notes = measured(lambda: run_one(name, rep, args, out_dir, model, prompt_ids), args)
        samples[name].append(dict(aggregate_prompts(per_prompt), repeat=rep, **notes, per_prompt=per_prompt))
    pingpong, meta["pingpong_notes"] = measured(lambda: bench_p2p.run(
        args.pingpong_iters, 576, out_dir / "raw", out_dir / "logs" / "pingpong.log"), args) \
        if args.pingpong_iters > 0 else ({}, {})
    meta["loadavg_1min_end"] = os.getloadavg()[0]
    summary = build_summary(samples, pingpong)
    summary["greedy_prompts_identical_to_hf_t1"] = token_agreement(samples)
    return {"meta": meta, "prompts": texts, "prompt_ids": prompt_ids, "summary": summary,
            "samples": samples, "pingpong_rtt_seconds": pingpong}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 prompt x 24 tokens, R=1, 300 pings")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every config")
    p.add_argument("--prompts", default="mt_bench", help="builtin prompt set name or jsonl path")
    p.add_argument("--prompts-limit", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma list of hf_t<T> and ours_pp<P>[_t<T>][_lean|_local][_compiled]")
    p.add_argument("--iters", dest="pingpong_iters", type=int, default=2000, help="ping-pong round trips (0: skip)")
    p.add_argument("--hf", default=str(CACHE / "hf" / "smollm2-135m-instruct"), help="HF model folder")
    p.add_argument("--checkpoint", default=str(CACHE / "checkpoints" / "smollm2-135m-instruct-float32"))
    p.add_argument("--idle-wait", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for other processes to go idle (0: off)")
    p.add_argument("--max-other-cores", type=float, default=0.25,
                   help="rerun a measurement when other processes used more CPU cores than this during it")
    p.add_argument("--retries", type=int, default=2, help="reruns of a disturbed measurement (then keep it)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_baseline"), help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts_limit, args.max_new_tokens, args.repeats, args.pingpong_iters = 1, 24, 1, 300
    args.configs = [c for c in args.configs.split(",") if c]
    for name in args.configs:
        try:
            parse_config(name)
        except ValueError as err:
            p.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run_benchmark(args)
    out_dir = Path(args.out)
    (out_dir / "bench_baseline.json").write_text(json.dumps(doc, indent=1))
    plot_chart(doc["samples"], doc["summary"], out_dir / "bench_baseline.png")
    print_tables(doc["summary"])
    print(f"wrote {out_dir / 'bench_baseline.json'} and {out_dir / 'bench_baseline.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
