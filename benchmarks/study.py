"""The paper's comparison at small scale, on the embedded review task, with an equal annotation budget.

    python benchmarks/study.py                 # runs what is missing, then writes docs/results_table.md and figures
    python benchmarks/study.py --report-only   # rebuild the tables and figure from benchmarks/results/study.jsonl
    python benchmarks/study.py --quick         # 1 seed, small budget: a smoke run of the whole pipeline

Regimes (docs/algorithm.md §1.2), full fine-tuning: offline DPO (F = 1), BPO, F ∈ {2, 4, T}, the same schedules with the
SFT model as reference instead of the behavior (F ∈ {2, 4}: the trust-region ablation) and on-policy DPO (F = T,
reference = SFT); losses DPO, IPO, SLiC; seeds 0-4. Each finished run appends one line to
``benchmarks/results/study.jsonl`` (per-prompt gold outcomes included), so an interrupted study resumes where it
stopped. Evaluation: the framework's own (``bpo_lightning.evaluation``) on the final policy, 2 samples per held-out
prompt on all 330 distinct held-out prompts (temperature 1, fixed seed), gold reward vs the prompt's reference,
strict win.

Statistics: every run of a cell shares the evaluation prompts, and every regime of a seed shares its prompt order,
so comparisons are *paired*: the difference of two regimes is taken per seed and prompt, and its 95 % interval is a
two-level bootstrap (seeds resampled, then prompts within each resampled seed), which includes seed-to-seed
variance. Per-cell intervals use the same two-level bootstrap.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from bpo_lightning import DPOLoss, Frozen, HardSync, IPOLoss, RuleAnnotator, SLiCLoss
from bpo_lightning.data import OnlineDataModule
from bpo_lightning.evaluation import Evaluation, EvaluationMetrics, evaluation_step
from bpo_lightning.lora import LoRA
from bpo_lightning.module import BPOModule
from bpo_lightning.policy import EmbeddedSFT
from bpo_lightning.prompts import ReviewPrompts
from bpo_lightning.sampling import GenerateSampler

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "study.jsonl"
LOSSES = {"DPO": DPOLoss, "IPO": IPOLoss, "SLiC": SLiCLoss}


def regimes(budget: int, batch: int) -> dict[str, dict]:
    steps = budget // batch  # T: one phase per step is on-policy in the paper's released runs
    return {
        "offline DPO (F=1)": {"phases": 1, "behavior": Frozen, "reference": "behavior"},
        "BPO (F=2)": {"phases": 2, "behavior": HardSync, "reference": "behavior"},
        "BPO (F=4)": {"phases": 4, "behavior": HardSync, "reference": "behavior"},
        "BPO (F=T)": {"phases": steps, "behavior": HardSync, "reference": "behavior"},
        "reference = SFT (F=2)": {"phases": 2, "behavior": HardSync, "reference": "initial"},
        "reference = SFT (F=4)": {"phases": 4, "behavior": HardSync, "reference": "initial"},
        "on-policy DPO (F=T)": {"phases": steps, "behavior": HardSync, "reference": "initial"},
    }


#: (A, B): the paired differences A − B reported for every loss
COMPARISONS = (
    ("BPO (F=2)", "offline DPO (F=1)"),
    ("BPO (F=2)", "on-policy DPO (F=T)"),
    ("BPO (F=4)", "on-policy DPO (F=T)"),
    ("BPO (F=2)", "reference = SFT (F=2)"),
    ("BPO (F=4)", "reference = SFT (F=4)"),
    ("BPO (F=T)", "on-policy DPO (F=T)"),
)

START = "SFT start (no training)"


def plan(seeds: list[int], budget: int, batch: int) -> list[dict]:
    runs = [{"regime": START, "loss": "-", "params": "full", "seed": 0}]  # the common starting point
    for seed in seeds:
        for regime in regimes(budget, batch):
            for loss in LOSSES:
                runs.append({"regime": regime, "loss": loss, "params": "full", "seed": seed})
    return runs


def run_one(spec: dict, budget: int, batch: int, eval_prompts: int, work: Path) -> dict:
    if spec["regime"] == START:
        start = time.perf_counter()
        module = BPOModule(policy=EmbeddedSFT())
        module.configure_model()
        return {**spec, **evaluate(module, eval_prompts), "seconds": round(time.perf_counter() - start, 1)}
    regime = regimes(budget, batch)[spec["regime"]]
    lora = None if spec["params"] == "full" else LoRA(r=16, alpha=32, members=5 if "x5" in spec["params"] else 1)
    torch.manual_seed(spec["seed"])
    module = BPOModule(
        policy=EmbeddedSFT(),
        loss=LOSSES[spec["loss"]](),
        behavior=regime["behavior"](),
        reference=regime["reference"],
        lora=lora,
        lr=5e-3 if lora else 5e-4,
        # as the recorded results were computed: a rerun reproduces them bit for bit
        behavior_logps="forward",
        share_prompts=False,
    )
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward"),
        sampler=sampler(),
        budget=budget,
        num_phases=regime["phases"],
        batch_size=batch,
        seed=spec["seed"],
        annotation_cache=None,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=regime["phases"],
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        default_root_dir=str(work),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {**spec, **evaluate(module, eval_prompts), "seconds": round(time.perf_counter() - start, 1)}


def evaluate(module: BPOModule, limit: int) -> dict:
    """The framework's evaluation (``bpo_lightning.evaluation``) of the final policy, with per-prompt outcomes."""
    module.evaluation = Evaluation(temperature=1.0, samples_per_prompt=2, kl_samples=0, save_responses=False)
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward"),
        eval_prompts=ReviewPrompts("eval", limit=limit),
        sampler=sampler(),
        annotation_cache=None,
        eval_batch_size=64,
    )
    data.setup("validate")
    metrics = EvaluationMetrics()
    inputs = data.evaluation_inputs()
    records = [r for batch in data.eval_batches() for r in evaluation_step(module, inputs, batch, metrics)]
    result = metrics.compute()
    outcomes: dict[int, list[float]] = {}
    for r in records:
        outcomes.setdefault(r["index"], []).append(float(r["score"] > r["reference_score"]))
    return {
        "win_rate": result["win_rate"],
        "gold": result["reward"],
        "length": result["length"],
        "repetition": result["repetition"],
        "outcomes": list(outcomes.values()),  # per prompt, per sample: 1 = beats the reference
    }


def sampler() -> GenerateSampler:
    # whole-vocabulary draws, every row running its own prompt, as the recorded results were sampled
    return GenerateSampler(
        max_new_tokens=48, batch_size=64, max_prompt_tokens=64, progress=False, draw="vocabulary", share_prompts=False
    )


def per_prompt(run: dict) -> list[float]:
    """The run's outcome on each held-out prompt (mean over its samples)."""
    return [sum(o) / len(o) for o in run["outcomes"]]


def two_level_bootstrap(per_seed: list[list[float]], draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``per_seed`` values (one list of per-prompt values per seed):
    resample seeds, then prompts within each resampled seed, so the interval includes seed-to-seed variance."""
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        seeds = rng.choices(per_seed, k=len(per_seed))
        means.append(sum(sum(rng.choices(p, k=len(p))) / len(p) for p in seeds) / len(seeds))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def paired(a: list[dict], b: list[dict]) -> dict:
    """A − B over the seeds both have: mean difference, its two-level bootstrap interval, seeds where A wins."""
    by_seed = {r["seed"]: r for r in b}
    pairs = [(per_prompt(r), per_prompt(by_seed[r["seed"]])) for r in a if r["seed"] in by_seed]
    diffs = [[x - y for x, y in zip(pa, pb, strict=True)] for pa, pb in pairs]
    per_seed = [sum(d) / len(d) for d in diffs]
    low, high = two_level_bootstrap(diffs)
    return {
        "diff": sum(per_seed) / len(per_seed),
        "low": low,
        "high": high,
        "seeds": len(per_seed),
        "a_better": sum(d > 0 for d in per_seed),
    }


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def report(results: list[dict], out: Path, command: str) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["params"], r["loss"], r["regime"]), []).append(r)
    lines = [
        "| loss | regime | seeds | gold win rate (mean ± std over seeds) | 95% CI (seeds and prompts) | gold reward | "
        "length (words) | repeated 3-grams | time / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = [START, *regimes(1, 1)]
    for (_, loss, regime), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][2]))):
        low, high = two_level_bootstrap([per_prompt(r) for r in runs])
        lines.append(
            f"| {loss} | {regime} | {len(runs)} | {mean_std([r['win_rate'] for r in runs])} | "
            f"[{low:.3f}, {high:.3f}] | {mean_std([r['gold'] for r in runs])} | "
            f"{mean_std([r['length'] for r in runs])} | {mean_std([r['repetition'] for r in runs])} | "
            f"{sum(r['seconds'] for r in runs) / len(runs):.0f} s |"
        )
    lines += [
        "",
        "Paired differences of gold win rate, A − B, same seeds and prompts (95 % CI: two-level bootstrap over seeds "
        "and prompts; *significant* when it excludes 0):",
        "",
        "| loss | A | B | A − B | 95% CI | seeds where A > B | |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        for a, b in COMPARISONS:
            if ("full", loss, a) not in groups or ("full", loss, b) not in groups:
                continue
            d = paired(groups[("full", loss, a)], groups[("full", loss, b)])
            verdict = "significant" if d["low"] > 0 or d["high"] < 0 else "not significant"
            lines.append(
                f"| {loss} | {a} | {b} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
                f"{d['a_better']} of {d['seeds']} | {verdict} |"
            )
    table = "\n".join(lines)
    plot(groups, out.parent / "figures" / "study_win_rate.png")
    return f"<!-- generated by `{command}`; do not edit by hand -->\n\n{table}\n"


def plot(groups: dict, path: Path) -> None:
    """Win rate with 95 % CIs (seeds and prompts) per loss · regime; the dashed line is the SFT start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(regimes(1, 1))
    colors = {"offline": "tab:gray", "BPO": "tab:blue", "reference": "tab:orange", "on-policy": "tab:green"}
    fig, axes = plt.subplots(1, len(LOSSES), figsize=(15, 5), sharey=True, squeeze=False)
    start = groups.get(("full", "-", START))
    for ax, loss in zip(axes[0], LOSSES, strict=True):
        rows = [
            (i, regime, groups[("full", loss, regime)])
            for i, regime in enumerate(order)
            if ("full", loss, regime) in groups
        ]
        for i, regime, runs in rows:
            mean = sum(r["win_rate"] for r in runs) / len(runs)
            low, high = two_level_bootstrap([per_prompt(r) for r in runs])
            color = next(c for key, c in colors.items() if regime.startswith(key))
            ax.bar(i, mean, yerr=[[mean - low], [high - mean]], color=color, alpha=0.85, capsize=3)
        if start:
            ax.axhline(start[0]["win_rate"], color="black", linestyle="--", linewidth=1, label="SFT start")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=8)
        ax.set_title(loss)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("gold win rate vs reference\n(mean over seeds, 95% CI over seeds and prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=1024, help="annotated prompts per run")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step (T = budget / batch)")
    parser.add_argument("--eval-prompts", type=int, default=330, help="held-out prompts (all 330 by default)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results_table.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 64: checks the pipeline end to end")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budget, args.eval_prompts = [0, 1], 64, 16
        args.results, args.out = Path("/tmp/bpo-study-quick.jsonl"), Path("/tmp/bpo-study-quick/results_table.md")
    done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    if not args.report_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        keys = {(r["regime"], r["loss"], r["params"], r["seed"]) for r in done}
        todo = [
            s
            for s in plan(args.seeds, args.budget, args.batch)
            if (s["regime"], s["loss"], s["params"], s["seed"]) not in keys
        ]
        for i, spec in enumerate(todo, 1):
            slug = "-".join(str(v) for v in (*spec.values(), args.budget, args.batch)).replace(" ", "_")
            work = Path("/tmp/bpo-study") / slug
            shutil.rmtree(work, ignore_errors=True)  # a fresh run directory: nothing of an earlier study is reused
            result = run_one(spec, args.budget, args.batch, args.eval_prompts, work)
            with args.results.open("a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
            print(f"[{i}/{len(todo)}] {spec} win {result['win_rate']:.3f} ({result['seconds']} s)", flush=True)
    command = "python benchmarks/study.py" + (" --quick" if args.quick else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(done, args.out, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
