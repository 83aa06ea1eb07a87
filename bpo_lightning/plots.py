"""Figures of a run's phases, and of several runs side by side.

Each run's ``PhaseReport`` writes ``report.json`` (one entry per phase: evaluation and training summaries) and
``plots/phases.png`` into the run directory after every phase. Compare runs with::

    bpo compare runs/quickstart/bpo runs/quickstart/offline_dpo --out compare.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("win_rate", "win rate vs reference"),
    ("reward", "evaluator (gold) reward"),
    ("proxy_reward", "annotator (proxy) reward"),
    ("kl_initial", "KL(policy‖initial)"),
    ("kl_behavior", "KL(policy‖behavior)"),
    ("kl", "KL(policy‖behavior), training pairs"),
    ("length", "response length (words)"),
    ("repetition", "repeated 3-gram rate"),
)


def plot_histories(histories: dict[str, list[dict]], out: str | Path) -> Path:
    """A grid of panels (see ``PANELS``), one line per run, phases on the x axis (evaluations every N steps fall
    between phases). Panels no run has are left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in PANELS if any(h.get(k) is not None for hs in histories.values() for h in hs)]
    cols = min(max(len(panels), 1), 4)
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for name, history in histories.items():
            points = [(h["phase"], h[key]) for h in history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("phase (0 = start)")
        ax.grid(alpha=0.3)
    if panels:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def load_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `bpo fit`?")
    return json.loads(path.read_text())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bpo compare", description="Plot several runs' phases in one figure")
    parser.add_argument("runs", nargs="+", help="run directories (each with a report.json)")
    parser.add_argument("--out", default="compare.png", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        histories = {Path(run).name: load_history(run) for run in args.runs}
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"wrote {plot_histories(histories, args.out)}")
