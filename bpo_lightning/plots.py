"""Figures of a run's phases, and of several runs side by side.

Each run's ``PhaseReport`` writes ``report.json`` (one entry per phase: evaluation and training summaries) and
``plots/phases.png`` (when the fit ends) into the run directory. Compare runs, finished or running, with::

    bpo compare runs/recipes/bpo runs/recipes/offline_dpo --out compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bpo_lightning.files import atomic_file

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


STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # runs with equal values stay visible
ERRORS = {"kl_initial": "kl_initial_stderr", "kl_behavior": "kl_behavior_stderr"}  # ±1 standard error bars


def plot_histories(histories: dict[str, list[dict]], out: str | Path) -> Path:
    """A grid of panels (see ``PANELS``), one line per run, phases on the x axis (evaluations every N steps fall
    between phases), KL estimates with ±1 standard error. Panels no run has are left out; runs are told apart by
    line style and marker as well as colour and drawn slightly apart along x; the legend sits below the panels."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(k, t) for k, t in PANELS if any(h.get(k) is not None for hs in histories.values() for h in hs)]
    cols = min(max(len(panels), 1), 4)
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    last = max((h["phase"] for hs in histories.values() for h in hs), default=0)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for k, (name, history) in enumerate(histories.items()):
            rows_with = [h for h in history if h.get(key) is not None]
            if not rows_with:
                continue
            line, marker = STYLES[k % len(STYLES)]
            dodge = (k - (len(histories) - 1) / 2) * 0.04  # runs with equal values side by side, not on top
            x, y = [h["phase"] + dodge for h in rows_with], [h[key] for h in rows_with]
            errors = [h.get(ERRORS[key]) or 0.0 for h in rows_with] if key in ERRORS else None
            ax.errorbar(x, y, yerr=errors, linestyle=line, marker=marker, capsize=3, label=name, alpha=0.85,
                        markersize=6 - min(k, 3))  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("phase (0 = start)")
        ax.set_xlim(-0.25, max(1, last) + 0.25)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if panels:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.4 * rows + 0.6), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(out, "wb") as f:  # a kill while drawing leaves the previous figure, never a torn one
            fig.savefig(f, dpi=100, format=out.suffix.lstrip(".") or "png")
    finally:
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
    names = [Path(run).name for run in args.runs]
    labels = [name if names.count(name) == 1 else str(Path(run)) for name, run in zip(names, args.runs, strict=True)]
    try:
        histories = {label: load_history(run) for label, run in zip(labels, args.runs, strict=True)}
    except FileNotFoundError as err:
        parser.error(str(err))
    for label, history in histories.items():
        if not any(h["phase"] >= 1 for h in history):
            print(f"bpo compare: {label} has not finished a phase yet: only its start is drawn", file=sys.stderr)
    print(f"wrote {plot_histories(histories, args.out)}")
