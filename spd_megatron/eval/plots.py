"""PNG plots of an eval summary (matplotlib, Agg): acceptance by draft position, cycle phases."""

from __future__ import annotations

from pathlib import Path

PHASE_COLORS = {"stage_compute": "#4c72b0", "draft": "#dd8452", "verify": "#55a868",
                "comm_wait": "#c44e52", "other": "#bbbbbb"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acceptance_by_position(summary: dict, path: Path) -> bool:
    """Bars: pooled acceptance per draft position of each configuration that has drafts."""
    series = {name: s["acceptance_by_position"] for name, s in summary["configs"].items()
              if s["acceptance_by_position"]["pooled"]}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, acc) in enumerate(series.items()):
        positions = [int(k) for k in acc["pooled"]]
        rates = list(acc["pooled"].values())
        bars = ax.bar([p + i * width for p in positions], rates, width, label=name)
        ax.bar_label(bars, labels=[f"{r:.2f}\nn={acc['verified'][k]}" for k, r in acc["pooled"].items()], fontsize=7)
        ax.set_xticks(positions)
    ax.set_xlabel("draft position (in-flight tokens ahead of the draft when it was proposed)")
    ax.set_ylabel("acceptance rate (pooled)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"Acceptance by draft position, {summary.get('prompts_file', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_phase_breakdown(summary: dict, path: Path) -> bool:
    """Stacked bars: decode ms per token of each configuration, split into the stats' phases."""
    configs = summary["configs"]
    if not configs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(configs)), 4))
    names = list(configs)
    bottom = [0.0] * len(names)
    for phase, color in PHASE_COLORS.items():
        heights = [configs[n]["phase_ms_per_token"][phase] for n in names]
        ax.bar(names, heights, bottom=bottom, color=color, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, n in enumerate(names):
        tok_s = configs[n]["decode_tokens_per_s"]["pooled"] or 0.0
        ax.text(i, bottom[i], f"{tok_s:.1f} tok/s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode ms per token (reporting rank)")
    ax.set_title("Decode time per token by phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    """Both plots into ``out_dir``; returns the files written."""
    written = []
    for name, plot in (("acceptance_by_position.png", plot_acceptance_by_position),
                       ("phase_breakdown.png", plot_phase_breakdown)):
        if plot(summary, out_dir / name):
            written.append(out_dir / name)
    return written
