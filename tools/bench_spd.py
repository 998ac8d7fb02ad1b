#!/usr/bin/env python
"""SPD's ceiling on this machine: SPD with an oracle draft (every draft right) vs autoregressive.

    python tools/bench_spd.py [--prompts mt_bench] [--limit 3] [--max-new-tokens 64] [--repeats 2]

Side by side in one run, same prompts and tokens, greedy fp32, SmolLM2-135M-Instruct:
  ar_pp1       autoregressive, 1 process
  ar_pp2       autoregressive, PP=2 (one token in flight)
  spd_oracle   SPD, PP=2, a draft that knows the greedy continuation (tokens/cycle -> 1)
  spd_pdm      SPD, PP=2, the PDM schedule.name=spd picks: the shipped n=2 draft for the builtin
               model's default split (a random PDM before drafts shipped, see docs/benchmarks.md)
  hf_t<T>      HF ``generate`` (greedy, eager) in the driver with T = --hf-threads threads
                 (default 2: both cores, as the two ranks get); tokens checked against ar_pp1
``--layer-spec`` picks model.layer_spec for our runs (default: the config's, lean on CPU).
``--splits 15,15 18,12`` runs the PP=2 rows once per stage split (rows named ``spd_oracle@18,12``;
default: the split an SPD run takes by itself); ``--drafts DIR ...`` are PDMs for spd_pdm, each
used for the split it was trained for (default: the shipped one; no draft for a split: no row).
Per-cycle overhead = cycle time - the slowest stage's compute per cycle (from every rank).
Writes a table, runs/bench_spd/bench_spd.json and bench_spd.png. ``--worker`` is the torchrun side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
RUNS = {"ar_pp1": 1, "ar_pp2": 2, "spd_oracle": 2, "spd_pdm": 2}


# ---- worker (under torchrun) -----------------------------------------------------------------
def worker(args) -> None:
    import torch

    from spd_megatron.config import load_config
    from spd_megatron.draft import OracleDraft
    from spd_megatron.engine import build_engine, build_schedule
    from spd_megatron.eval.prompts import encode_prompt, read_prompts_file
    from spd_megatron.parallel.link import gather_to_rank0
    from spd_megatron.schedule.spd import SPDSchedule

    from spd_megatron.errors import SPDError

    spec = [f"model.layer_spec={args.layer_spec}"] if args.layer_spec else []
    spec += [f"parallel.layers_per_stage=[{args.split}]"] if args.split else []
    spec += [f"draft.path={d}" for d in args.drafts if args.split and trained_for(d) == args.split][:1]
    cfg = load_config("default", [f"max_new_tokens={args.max_new_tokens}", "schedule.name=spd"] + spec)
    engine_cfg = load_config("default", [f"max_new_tokens={args.max_new_tokens}"] + spec)
    if not args.split and int(os.environ.get("WORLD_SIZE", "1")) == 2:  # the split an SPD run would take
        engine_cfg.parallel.layers_per_stage = spd_split(cfg)
    engine = build_engine(engine_cfg)
    pdm = None
    if engine.ctx.pp_size > 1:
        try:
            pdm = build_schedule(cfg, engine.stage, engine.schedule.link, engine.checkpoint, engine.ctx)
        except SPDError as err:  # no draft for this split: the oracle row only
            print(f"spd_pdm skipped: {err}", file=sys.stderr)
    records = []
    for text in read_prompts_file(args.prompts, args.limit):
        ids = encode_prompt(engine.tokenizer, text)
        ref = engine.schedule.generate(ids, args.max_new_tokens)
        records.append(("ar", ref.stats.to_dict(), ref.output_ids))
        if engine.ctx.pp_size == 1:
            continue
        first = engine.stage.placement.is_first
        oracle = OracleDraft(ids + ref.output_ids, engine.arch.vocab_size) if first else None
        spd = SPDSchedule(engine.stage, engine.schedule.link, engine.schedule.sampling, draft=oracle)
        for name, sched in (("spd_oracle", spd), ("spd_pdm", pdm)):
            if sched is None:
                continue
            out = sched.generate(ids, args.max_new_tokens)
            records.append((name, out.stats.to_dict(), out.output_ids))
            assert not first or out.output_ids == ref.output_ids, "SPD must equal autoregressive"
    gathered = gather_to_rank0(records)
    if engine.ctx.rank == 0:
        Path(args.worker_out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def trained_for(folder: str) -> str:
    """The split a PDM folder was trained for, as "a,b"."""
    return ",".join(map(str, json.loads((Path(folder) / "pdm_config.json").read_text())["split"]))


def spd_split(cfg) -> list[int]:
    """The PP=2 split schedule.name=spd takes without parallel.layers_per_stage."""
    from spd_megatron.convert.checkpoint import read_arch
    from spd_megatron.engine import resolve_checkpoint, stage_split

    return stage_split(cfg, read_arch(resolve_checkpoint(cfg)), 2)


# ---- driver ----------------------------------------------------------------------------------
def launch(nproc: int, args, out: Path, split: str = "") -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--worker", "--worker-out", str(out), "--prompts", args.prompts,
           "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--layer-spec", args.layer_spec] if args.layer_spec else []
    cmd += ["--split", split] if split else []
    cmd += ["--drafts", *args.drafts] if args.drafts else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def per_cycle(records_by_rank: list, name: str) -> dict:
    """Totals over prompts for one configuration, with every rank's stage compute."""
    rank0 = [s for n, s, _ in records_by_rank[0] if n == name]
    tokens = sum(s["new_tokens"] - 1 for s in rank0)
    seconds = sum(s["decode_seconds"] for s in rank0)
    cycles = sum(s["cycles"] for s in rank0)
    compute = [sum(s["stage_compute_seconds"] for n, s, _ in recs if n == name) for recs in records_by_rank]
    cycle_ms = 1000 * seconds / cycles
    slowest_ms = 1000 * max(compute) / cycles
    return {"decode_tokens_per_s": tokens / seconds, "cycles": cycles, "tokens_per_cycle": tokens / cycles,
            "E": rank0[0]["pipeline_depth"] * tokens / cycles, "cycle_ms": cycle_ms,
            "stage_ms": [1000 * c / cycles for c in compute],  # every rank's compute per cycle
            "slowest_stage_ms": slowest_ms, "overhead_ms": cycle_ms - slowest_ms,
            "draft_ms": 1000 * sum(s["draft_seconds"] for s in rank0) / cycles,
            "wait_ms": 1000 * sum(s["comm_wait_seconds"] for s in rank0) / cycles,
            "acceptance_rate": sum(s["accepted"] for s in rank0) / max(sum(s["verified"] for s in rank0), 1)}


def hf_run(model, args) -> tuple[dict, list]:
    """HF generate on the same prompts with --hf-threads threads: decode tok/s over all prompts, ids."""
    import torch
    from transformers import AutoTokenizer

    from spd_megatron.eval.hf_generate import hf_generate
    from spd_megatron.eval.prompts import encode_prompt, read_prompts_file

    torch.set_num_threads(args.hf_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
    runs = [hf_generate(model, encode_prompt(tokenizer, t), args.max_new_tokens)
            for t in read_prompts_file(args.prompts, args.limit)]
    tokens, seconds = sum(r["decode_tokens"] for r in runs), sum(r["decode_seconds"] for r in runs)
    return {"decode_tokens_per_s": tokens / seconds}, [r["output_ids"] for r in runs]


def run(args) -> dict:
    from tqdm import tqdm

    from spd_megatron.eval.hf_generate import load_hf

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_name = f"hf_t{args.hf_threads}"
    splits = args.splits or [""]
    rows = ["ar_pp1"] + [f"{n}{'@' + s if s else ''}" for s in splits for n, p in RUNS.items() if p == 2]
    samples = {name: [] for name in (*rows, hf_name)}
    model, same = load_hf(args.hf) if args.hf_threads else None, []
    for rep in tqdm(range(args.repeats), desc="repeats"):
        for nproc, split in [(1, "")] + [(2, s) for s in splits]:
            recs = launch(nproc, args, out_dir / f"worker_{nproc}_{split.replace(',', '-')}_{rep}.json", split)
            for name in [n for n, p in RUNS.items() if p == nproc]:
                key = "ar" if name.startswith("ar") else name
                if any(n == key for n, _, _ in recs[0]):
                    samples[f"{name}{'@' + split if split else ''}"].append(per_cycle(recs, key))
            if nproc == 1 and model is not None:
                ours = [ids for n, _, ids in recs[0] if n == "ar"]
                sample, hf_ids = hf_run(model, args)
                samples[hf_name].append(sample)
                same.append(sum(a == b for a, b in zip(ours, hf_ids)))
    samples = {name: runs for name, runs in samples.items() if runs}
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "stage_ms"}
               for name, runs in samples.items()}
    base = medians["ar_pp1"]["decode_tokens_per_s"]
    for m in medians.values():
        m["speedup_vs_ar_pp1"] = m["decode_tokens_per_s"] / base
    if hf_name in medians:
        hf_rate = medians[hf_name]["decode_tokens_per_s"]
        for m in medians.values():
            m[f"speed_vs_{hf_name}"] = m["decode_tokens_per_s"] / hf_rate
    return {"args": vars(args), "load_avg": os.getloadavg(), "samples": samples, "medians": medians,
            "hf_prompts_identical_to_ar_pp1": same}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["decode_tokens_per_s", "speedup_vs_ar_pp1", "tokens_per_cycle", "E", "acceptance_rate",
            "cycle_ms", "slowest_stage_ms", "overhead_ms", "draft_ms", "wait_ms"]
    table = Table(title="SPD ceiling (oracle draft) vs autoregressive, medians")
    table.add_column("config")
    for c in cols:
        table.add_column(c, justify="right")
    hf = [k for k in next(iter(result["medians"].values())) if k.startswith("speed_vs_")]
    for c in hf:
        table.add_column(c, justify="right")
    for name, m in result["medians"].items():
        table.add_row(name, *(f"{m[c]:.3f}" if isinstance(m.get(c), float) else str(m.get(c, "-"))
                              for c in cols + hf))
    Console(width=200).print(table)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["medians"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [result["medians"][n]["decode_tokens_per_s"] for n in names], color="#4c72b0")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M fp32, 2-core CPU: SPD ceiling vs autoregressive")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="mt_bench")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "bench_spd"))
    p.add_argument("--layer-spec", default="", help="model.layer_spec of our runs (default: the config's)")
    p.add_argument("--hf-threads", type=int, default=2, help="threads of the HF generate row (0: no HF row)")
    p.add_argument("--hf", default=str(Path.home() / ".cache" / "spd_megatron" / "hf" / "smollm2-135m-instruct"))
    p.add_argument("--splits", nargs="*", default=[], help="PP=2 stage splits to compare, e.g. 15,15 18,12")
    p.add_argument("--drafts", nargs="*", default=[], help="PDM folders for spd_pdm, matched to --splits by their split")
    p.add_argument("--split", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = run(args)
    print_table(result)
    out = Path(args.out)
    (out / "bench_spd.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_spd.png")
    print(f"wrote {out / 'bench_spd.json'} and bench_spd.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
