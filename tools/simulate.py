#!/usr/bin/env python
"""The SPD cycle-time model: check it against a measured run, then predict other n and alpha.

    python tools/simulate.py [--bench runs/bench_spd/bench_spd.json] [--eval runs/eval/X/summary.json]
                             [--out runs/simulate]

1. Validation: from the measured oracle run (tools/bench_spd.py) take the slowest stage's compute,
   the draft and verification times and the p2p hop, predict cycle time and E, and print how far
   the measured values are.
2. Prediction: speedup over single-device autoregressive decoding for n = 2..16 and several alpha,
   (a) on this CPU (per-stage compute = measured PP=2 stage time scaled by 2/n, 2 cores shared) and (b) on an
   idealised accelerator node (compute splits perfectly, 20 us hops, draft = 5 % of the model).
Writes simulate.json and speedup_vs_stages.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from spd_megatron.eval.cycle_model import (
    CycleCosts,
    cycle_ms,
    equivalent_accept_length,
    speedup,
    split_costs,
    tokens_per_cycle,
)

REPO = Path(__file__).resolve().parents[1]
ALPHAS = (0.5, 0.75, 0.9)
STAGES = (2, 3, 4, 6, 8, 12, 16)


def validate(bench: dict, hop_ms: float) -> dict:
    """Predicted vs measured cycle time and E for the oracle run (alpha = 1)."""
    runs = bench["samples"]["spd_oracle"]
    slowest = statistics.median(r["slowest_stage_ms"] for r in runs)
    draft = statistics.median(r["draft_ms"] for r in runs)
    measured_cycle = statistics.median(r["cycle_ms"] for r in runs)
    measured_e = statistics.median(r["E"] for r in runs)
    costs = CycleCosts((slowest, slowest), draft_ms=draft, verify_ms=0.1, hop_ms=hop_ms)
    predicted_cycle, predicted_e = cycle_ms(costs), equivalent_accept_length(1.0, 2)
    return {"predicted_cycle_ms": predicted_cycle, "measured_cycle_ms": measured_cycle,
            "cycle_error": measured_cycle / predicted_cycle - 1, "predicted_E": predicted_e,
            "measured_E": measured_e, "E_error": measured_e / predicted_e - 1}


def validate_eval(summary: dict, hop_ms: float) -> dict:
    """Predicted vs measured E, cycle time and tokens/s of a tools/eval.py run with a real draft.

    The model gets the run's measured alpha and stage 0's measured per-cycle phases (stage compute,
    PDM, verification; an even split is assumed for the other stages) and predicts E with i.i.d.
    acceptance and the cycle time; ``other`` is what the model leaves out (Python, bookkeeping).
    """
    run = summary["configs"][summary["main"]]
    tpc, alpha = run["tokens_per_cycle"]["pooled"], run["alpha"]["pooled"]
    n = round(run["E"]["pooled"] / tpc)
    per_cycle = {k: v * tpc for k, v in run["phase_ms_per_token"].items()}  # ms per cycle
    costs = CycleCosts(tuple([per_cycle["stage_compute"]] * n), draft_ms=per_cycle["draft"],
                       verify_ms=per_cycle["verify"], hop_ms=hop_ms)
    predicted_e, predicted_cycle = equivalent_accept_length(alpha, n), cycle_ms(costs)
    predicted_tps = 1000.0 * tokens_per_cycle(alpha, n) / predicted_cycle
    measured_tps = run["decode_tokens_per_s"]["pooled"]
    return {"stages": n, "alpha": alpha, "predicted_E": predicted_e, "measured_E": run["E"]["pooled"],
            "E_error": run["E"]["pooled"] / predicted_e - 1, "predicted_cycle_ms": predicted_cycle,
            "measured_cycle_ms": per_cycle["decode"], "cycle_error": per_cycle["decode"] / predicted_cycle - 1,
            "phases_ms_per_cycle": per_cycle, "predicted_tokens_per_s": predicted_tps,
            "measured_tokens_per_s": measured_tps}


def predict(bench: dict, hop_ms: float) -> dict:
    ar_ms = 1000 / bench["medians"]["ar_pp1"]["decode_tokens_per_s"]
    stage2 = bench["medians"]["spd_oracle"]["slowest_stage_ms"]
    out = {"cpu": {}, "ideal": {}, "ideal_dedicated": {}}
    for a in ALPHAS:
        out["cpu"][a] = [speedup(CycleCosts(tuple([stage2 * 2 / n] * n), verify_ms=0.1, hop_ms=hop_ms,
                                            workers=2), a, ar_ms) for n in STAGES]
        out["ideal"][a] = [speedup(split_costs(100.0, n, draft_ms=5.0, verify_ms=0.2, hop_ms=0.02), a, 100.0)
                           for n in STAGES]
        out["ideal_dedicated"][a] = [speedup(split_costs(100.0, n, draft_ms=5.0, verify_ms=0.2, hop_ms=0.02,
                                                         placement="dedicated"), a, 100.0) for n in STAGES]
    return out


def plot(pred: dict, bench: dict, path: Path, eval_summary: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in ((axes[0], "cpu", "this 2-core CPU (model)"), (axes[1], "ideal", "ideal accelerator node")):
        for a, ys in pred[key].items():
            ax.plot(STAGES, ys, "o-", label=f"alpha = {a}")
        ax.set_title(title)
        ax.set_xlabel("pipeline stages n")
        ax.grid(alpha=0.3)
    measured = bench["medians"]["spd_oracle"]["speedup_vs_ar_pp1"]
    axes[0].plot([2], [measured], "k*", markersize=12, label="measured, oracle draft (alpha = 1)")
    if eval_summary and "ar_pp1" in eval_summary.get("speedup", {}):
        run = eval_summary["configs"][eval_summary["main"]]
        n = round(run["E"]["pooled"] / run["tokens_per_cycle"]["pooled"])
        axes[0].plot([n], [eval_summary["speedup"]["ar_pp1"]["decode"]], "rX", markersize=10,
                     label=f"measured, trained draft (alpha = {run['alpha']['pooled']:.2f})")
    axes[0].set_ylabel("speedup over autoregressive, 1 device")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=str(REPO / "runs" / "bench_spd" / "bench_spd.json"))
    p.add_argument("--hop-ms", type=float, default=0.23, help="one-way p2p latency (docs/benchmarks.md)")
    p.add_argument("--out", default=str(REPO / "runs" / "simulate"))
    p.add_argument("--eval", default="", help="also check the model on a tools/eval.py summary.json")
    args = p.parse_args(argv)
    bench = json.loads(Path(args.bench).read_text())
    result = {"validation": validate(bench, args.hop_ms), "stages": STAGES, "prediction": predict(bench, args.hop_ms)}
    eval_summary = json.loads(Path(args.eval).read_text()) if args.eval else None
    if eval_summary:
        result["eval_validation"] = validate_eval(eval_summary, args.hop_ms)
        print(json.dumps(result["eval_validation"], indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(result, indent=2))
    plot(result["prediction"], bench, out / "speedup_vs_stages.png", eval_summary)
    print(json.dumps(result["validation"], indent=2))
    for key in ("cpu", "ideal", "ideal_dedicated"):
        for a, ys in result["prediction"][key].items():
            print(f"{key:15s} alpha={a}: " + "  ".join(f"n={n}:{y:.2f}x" for n, y in zip(STAGES, ys)))
    print(f"wrote {out / 'simulate.json'} and speedup_vs_stages.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
