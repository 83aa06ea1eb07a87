"""The paper's comparison at small scale, on the embedded review task, with an equal annotation budget.

    python benchmarks/study.py                 # runs what is missing, then writes docs/results.md and figures
    python benchmarks/study.py --report-only   # rebuild the table and figures from benchmarks/results/study.jsonl
    python benchmarks/study.py --quick         # 1 seed, small budget: a smoke run of the whole pipeline

Regimes (bpo_spec §1.2): offline DPO (F = 1), on-policy DPO (F = T, reference = initial), BPO with F ∈ {2, 4, T};
losses DPO, IPO, SLiC; full fine-tuning, a 5-member LoRA ensemble and a single LoRA. Each
finished run appends one line to ``benchmarks/results/study.jsonl`` (per-prompt gold outcomes included), so an
interrupted study resumes where it stopped. Evaluation: the framework's own (``bpo_lightning.evaluation``) on the
final policy, 2 samples per held-out prompt (temperature 1, fixed seed), gold reward vs the prompt's reference,
strict win.
"""

from __future__ import annotations

import argparse
import json
import math
import random
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
        "on-policy DPO (F=T)": {"phases": steps, "behavior": HardSync, "reference": "initial"},
        "BPO (F=2)": {"phases": 2, "behavior": HardSync, "reference": "behavior"},
        "BPO (F=4)": {"phases": 4, "behavior": HardSync, "reference": "behavior"},
        "BPO (F=T)": {"phases": steps, "behavior": HardSync, "reference": "behavior"},
    }


START = "SFT start (no training)"


def plan(seeds: list[int], budget: int, batch: int) -> list[dict]:
    runs = [{"regime": START, "loss": "-", "params": "full", "seed": 0}]  # the common starting point
    for seed in seeds:
        for regime in regimes(budget, batch):
            for params in ("full", "LoRA x5", "LoRA x1"):
                for loss in LOSSES:
                    runs.append({"regime": regime, "loss": loss, "params": params, "seed": seed})
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
        policy=EmbeddedSFT(), loss=LOSSES[spec["loss"]](), behavior=regime["behavior"](),
        reference=regime["reference"], lora=lora, lr=5e-3 if lora else 5e-4,
    )  # fmt: skip
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"), annotator=RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward"),
        sampler=sampler(),
        budget=budget, num_phases=regime["phases"], batch_size=batch, seed=spec["seed"], annotation_cache=None,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=regime["phases"], reload_dataloaders_every_n_epochs=1, logger=False,
        default_root_dir=str(work), enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        gradient_clip_val=1.0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {**spec, **evaluate(module, eval_prompts), "seconds": round(time.perf_counter() - start, 1)}


def evaluate(module: BPOModule, limit: int) -> dict:
    """The framework's evaluation (``bpo_lightning.evaluation``) of the final policy, with per-prompt outcomes."""
    module.evaluation = Evaluation(temperature=1.0, samples_per_prompt=2, kl_samples=0, save_responses=False)
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"), annotator=RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward"),
        eval_prompts=ReviewPrompts("eval", limit=limit), sampler=sampler(), annotation_cache=None, eval_batch_size=64,
    )  # fmt: skip
    data.setup("validate")
    metrics = EvaluationMetrics()
    records = [r for batch in data.eval_batches() for r in evaluation_step(module, batch, data, metrics)]
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
    return GenerateSampler(max_new_tokens=48, batch_size=64, max_prompt_tokens=64, progress=False)


def bootstrap_ci(runs: list[dict], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean win rate over seeds, resampling prompts within each seed (stratified)."""
    rng = random.Random(seed)
    per_seed = [[sum(o) / len(o) for o in r["outcomes"]] for r in runs]
    means = []
    for _ in range(draws):
        means.append(sum(sum(rng.choices(p, k=len(p))) / len(p) for p in per_seed) / len(per_seed))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def report(results: list[dict], out: Path, command: str) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["params"], r["loss"], r["regime"]), []).append(r)
    lines = [
        "| parameters | loss | regime | seeds | gold win rate (mean ± std) | 95% CI (bootstrap) | gold reward | "
        "length (words) | repeated 3-grams | time / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [START, *regimes(1, 1)]
    for (params, loss, regime), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        low, high = bootstrap_ci(runs)
        lines.append(
            f"| {params} | {loss} | {regime} | {len(runs)} | {mean_std([r['win_rate'] for r in runs])} | "
            f"[{low:.3f}, {high:.3f}] | {mean_std([r['gold'] for r in runs])} | "
            f"{mean_std([r['length'] for r in runs])} | {mean_std([r['repetition'] for r in runs])} | "
            f"{sum(r['seconds'] for r in runs) / len(runs):.0f} s |"
        )
    table = "\n".join(lines)
    plot(groups, out.parent / "figures" / "study_win_rate.png")
    return f"<!-- generated by `{command}`; do not edit by hand -->\n\n{table}\n"


def plot(groups: dict, path: Path) -> None:
    """Win rate with 95 % CIs per loss · regime: full fine-tuning (left), LoRA ensemble next to single LoRA (right);
    the dashed line is the SFT start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(regimes(1, 1), key=lambda r: r.startswith("on-policy"))  # offline, BPO F = 2, 4, T, on-policy
    cells = [(loss, regime) for loss in LOSSES for regime in order]
    start = groups.get(("full", "-", START))
    fig, axes = plt.subplots(1, 2, figsize=(14, 7), squeeze=False, sharey=True)
    panels = (("full fine-tuning", [("full", "tab:blue")]),
              ("LoRA: ensemble (K = 5) vs single", [("LoRA x5", "tab:orange"), ("LoRA x1", "tab:blue")]))  # fmt: skip
    for ax, (title, variants) in zip(axes[0], panels, strict=True):
        height = 0.8 / len(variants)
        for v, (params, color) in enumerate(variants):
            rows = [(i, groups[(params, *cell)]) for i, cell in enumerate(cells) if (params, *cell) in groups]
            if not rows:
                continue
            ys = [i - 0.4 + height * (v + 0.5) for i, _ in rows]
            means = [sum(r["win_rate"] for r in runs) / len(runs) for _, runs in rows]
            cis = [bootstrap_ci(runs) for _, runs in rows]
            errors = [[m - lo for m, (lo, _) in zip(means, cis, strict=True)],
                      [hi - m for m, (_, hi) in zip(means, cis, strict=True)]]  # fmt: skip
            ax.barh(ys, means, height=height, xerr=errors, color=color, alpha=0.85, label=params)
        if start:
            ax.axvline(start[0]["win_rate"], color="gray", linestyle="--", linewidth=1, label="SFT start")
        ax.set_yticks(range(len(cells)), [f"{loss} · {regime}" for loss, regime in cells], fontsize=8)
        ax.set_xlabel("gold win rate vs reference (mean over seeds, 95% bootstrap CI)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    axes[0][0].invert_yaxis()  # shared: the first cell on top in both panels
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=1024, help="annotated prompts per run")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step (T = budget / batch)")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results_table.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 64: checks the pipeline end to end")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budget, args.eval_prompts = [0], 64, 16
        args.results, args.out = Path("/tmp/bpo-study-quick.jsonl"), Path("/tmp/bpo-study-quick/results_table.md")
    done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    if not args.report_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        keys = {(r["regime"], r["loss"], r["params"], r["seed"]) for r in done}
        todo = [s for s in plan(args.seeds, args.budget, args.batch) if (s["regime"], s["loss"], s["params"],
                s["seed"]) not in keys]  # fmt: skip
        for i, spec in enumerate(todo, 1):
            slug = "-".join(str(v) for v in (*spec.values(), args.budget, args.batch)).replace(" ", "_")
            result = run_one(spec, args.budget, args.batch, args.eval_prompts, Path("/tmp/bpo-study") / slug)
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
