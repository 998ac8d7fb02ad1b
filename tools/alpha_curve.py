#!/usr/bin/env python
"""Acceptance of PDM checkpoints through the decode path: the alpha-vs-training-tokens curve.

    python tools/alpha_curve.py RUN_DIR [RUN_DIR ...] [--sets mt_bench humaneval] [--prompts 4]
                                [--new-tokens 128] [--only final] [--out runs/alpha_curve]

Each RUN_DIR is a tools/train_draft.py output folder (train.out): its snapshots/step_*/ (saved with
train.snapshot_every) and final/ are decoded greedily with ``examples/decode.py
schedule.name=spd`` on n processes (n = the draft's stage count, its own stage split), first turn
with the chat template, and the pooled alpha, tokens per cycle and E are read from each run's
report. Finished (checkpoint, set) pairs are skipped on a rerun. Prints a table, writes
OUT/alpha_curve.json and OUT/alpha_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from spd_megatron.eval.orchestrate import run_subprocess

ROOT = Path(__file__).resolve().parent.parent


def checkpoints(run_dir: Path) -> list[Path]:
    """Snapshots in step order, then final/ (when it exists)."""
    snaps = sorted((run_dir / "snapshots").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return snaps + ([run_dir / "final"] if (run_dir / "final" / "pdm_config.json").is_file() else [])


def tokens_seen(ckpt: Path) -> int:
    record = json.loads((ckpt / "training.json").read_text())
    return record.get("tokens_seen", 0)


def decode_report(run: Path, ckpt: Path, prompt_set: str, args) -> dict:
    """Run decode.py on the checkpoint (skipped when its report exists); the report's summary."""
    report = args.out / f"{run.name}_{ckpt.name}_{set_name(prompt_set)}.json"
    if not report.is_file():
        split = json.loads((ckpt / "pdm_config.json").read_text())["split"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(len(split)),
               str(ROOT / "examples" / "decode.py"), "schedule.name=spd", f"draft.path={ckpt}",
               f"parallel.layers_per_stage=[{','.join(map(str, split))}]", f"prompts_file={prompt_set}",
               f"prompts_limit={args.prompts}", f"max_new_tokens={args.new_tokens}", f"report.json={report}"]
        error = run_subprocess(f"decode of {ckpt} on {prompt_set}", cmd, report.with_suffix(".log"),
                               args.timeout_s, dict(os.environ, PYTHONUNBUFFERED="1"), "--timeout-s")
        if error:
            raise SystemExit(f"error: {error}")
    return json.loads(report.read_text())["summary"]


def set_name(prompt_set: str) -> str:
    """A prompt set's short name: the builtin name, or a jsonl path's stem."""
    return Path(prompt_set).stem


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (run, prompt_set) in sorted({(r["run"], r["set"]) for r in rows}):
        pts = sorted((r["tokens_seen"], r["alpha"]) for r in rows if r["run"] == run and r["set"] == prompt_set)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{run} / {prompt_set}")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("acceptance alpha (decode path, greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sets", nargs="+", default=["mt_bench", "humaneval"],
                        help="builtin prompt sets or EAGLE-format jsonl files")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--only", nargs="+", default=[], help="checkpoint names to evaluate (e.g. final)")
    parser.add_argument("--out", type=Path, default=Path("runs/alpha_curve"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(run, ckpt, s) for run in args.runs for ckpt in checkpoints(run) for s in args.sets
            if not args.only or ckpt.name in args.only]
    if not jobs:
        print("error: no checkpoints found (train with train.snapshot_every=N, or pass a train.out folder)",
              file=sys.stderr)
        return 2
    rows = []
    for run, ckpt, prompt_set in tqdm(jobs, desc="alpha curve", unit="decode"):
        s = decode_report(run, ckpt, prompt_set, args)
        rows.append({"run": run.name, "checkpoint": ckpt.name, "set": set_name(prompt_set), "tokens_seen": tokens_seen(ckpt),
                     "alpha": s["acceptance_rate"], "tokens_per_cycle": s["tokens_per_cycle"],
                     "E": s["equivalent_accept_length"], "decode_tokens_per_s": s["decode_tokens_per_s"]})
    print(f"{'run':<16} {'checkpoint':<12} {'set':<10} {'tokens':>9} {'alpha':>6} {'tok/cycle':>9} {'E':>5} {'tok/s':>6}")
    for r in rows:
        print(f"{r['run']:<16} {r['checkpoint']:<12} {r['set']:<10} {r['tokens_seen']:>9} {r['alpha']:>6.3f} "
              f"{r['tokens_per_cycle']:>9.3f} {r['E']:>5.2f} {r['decode_tokens_per_s']:>6.2f}")
    (args.out / "alpha_curve.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "rows": rows}, indent=1))
    plot(rows, args.out / "alpha_curve.png")
    print(f"wrote {args.out / 'alpha_curve.json'} and {args.out / 'alpha_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
