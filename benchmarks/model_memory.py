"""Peak memory of `bpo fit` on a SmolLM2-135M-shaped policy: full fine-tuning and LoRA, a fit and its resume.

The policy is a randomly initialised Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
MLP 1536; the embedded task's 768-token vocabulary instead of 49,152, so the task's tokenizer fits it: ~106M
parameters) in float32 on CPU, trained on the embedded review task with the quickstart's settings, shrunk: 2 phases
of 8 prompts, 32 new tokens, no held-out evaluation. Each case runs in a fresh process; its peak RSS is the
process's ``ru_maxrss``. "resume" restarts the same run from its phase-1 checkpoint and trains phase 2 again.

    python benchmarks/model_memory.py            # ~5 min on 2 CPU cores
    python benchmarks/model_memory.py --tables ensemble   # the LoRA ensemble, K = 1, 3, 5 members: ~40 min
    python benchmarks/model_memory.py --tables ensemble --members 1 3   # K = 1 and 3: ~20 min

The ensemble table trains K LoRA members (r=8) on 8 pairs a step (16 sequences of up to ~60 tokens, so that the
activations of a step are larger than the adapters), with ``lora.recompute_members`` (the default: each member's
forward runs again in the backward pass, one member at a time) and without it (all K members' activations held
for one backward). "peak / K=1" divides by the K=1 fit's peak; "above the model" subtracts the peak of a fit with
the same policy and no training steps (``trainer.limit_train_batches=0``: the model, π_β's log-probs, sampling).
Each row runs under glibc's malloc as it is and with ``MALLOC_MMAP_THRESHOLD_=65536`` ("returning": blocks over 64
KiB are given back to the OS when freed, so RSS follows what the tensors hold; see ``ALLOCATORS``).

``--policy FOLDER`` measures a real checkpoint instead, e.g. the offline SmolLM2-135M-Instruct (docs/real-world.md;
134.5M parameters, 49,152-token vocabulary), with its own tokenizer and no BOS:

    python benchmarks/model_memory.py --policy ~/.cache/bpo-lightning/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 256,
    "vocab_size": 768,
    "tie_word_embeddings": True,
}
LORA = ["--model.lora=bpo_lightning.lora.LoRA", "--model.lora.r=8", "--model.lora.alpha=16"]


def command(run: Path, tokenizer: Path, lora: bool, *extra: str, policy: str | None = None) -> list[str]:
    if policy:  # a real checkpoint, its own tokenizer
        model = [
            "--model.policy=bpo_lightning.policy.Pretrained",
            f"--model.policy.init_args.name_or_path={policy}",
            "--data.sampler.init_args.add_bos=false",  # VADER: the review task's gold reward ties on its text
            "--data.annotator.init_args.function=bpo_lightning.tasks.smollm2:vader_compound",
        ]
    else:
        model = [
            "--model.policy=bpo_lightning.policy.FromConfig",
            f"--model.policy.init_args.config={json.dumps(SHAPE)}",
            f"--model.policy.init_args.tokenizer={tokenizer}",
        ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"--trainer.default_root_dir={run}",
        *model,
        "--data.budget=16",
        "--data.num_phases=2",
        "--data.batch_size=4",
        "--data.sampler.init_args.max_new_tokens=32",
        "--data.sampler.init_args.batch_size=8",
        "--data.sampler.init_args.progress=false",
        "--data.eval_prompts=null",
        *(LORA if lora else []),
        *extra,
    ]


def digest_reward(prompt: str, response: str) -> float:
    """A score in [0, 1) that differs between any two responses (a random model's answers all tie under the task's
    gold reward): every prompt gives a pair, so every step has ``data.batch_size`` pairs."""
    return int(hashlib.sha256(response.encode()).hexdigest()[:8], 16) / 2**32


def case(argv: list[str]) -> None:
    from bpo_lightning.cli import main

    main(argv)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


# glibc's malloc settings for each allocator of the ensemble table: "glibc" as it is (its mmap threshold grows with
# the blocks freed, so large activation blocks end up in the heap, where a freed block stays resident), "returning"
# with a fixed 64 KiB threshold (every larger block is mapped on its own and given back to the OS when freed: the
# process's RSS then follows the memory its tensors hold)
ALLOCATORS = {"glibc": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def measure(argv: list[str], allocator: str = "glibc") -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **ALLOCATORS[allocator]}
    out = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(argv)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="a model folder to measure instead of the SmolLM2-135M-shaped random Llama")
    parser.add_argument("--tables", choices=["fit", "ensemble", "all"], default="fit")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3, 5], help="ensemble sizes to measure")
    parser.add_argument(
        "--allocators", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS), help="ensemble table: malloc"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case(json.loads(args.case))
        return
    if args.tables in ("fit", "all"):
        fit_table(args)
    if args.tables in ("ensemble", "all"):
        ensemble_table(args)


def ensemble_table(args) -> None:
    from bpo_lightning.tasks.reviews import ensure_sft

    step = [
        "--data.batch_size=8",
        "--data.sampler.init_args.max_new_tokens=48",
        "--data.budget=32",
        f"--data.annotator.init_args.function={Path(__file__).resolve()}:digest_reward",  # no ties: 8 pairs a step
    ]
    rows, floors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ensure_sft(Path(tmp) / "sft", steps=1, seed=0)

        def peak(name: str, allocator: str, *extra: str) -> tuple[int, float]:
            start = time.perf_counter()
            run = Path(tmp) / f"{allocator}-{name}"
            rss = measure(command(run, tokenizer, True, *step, *extra, policy=args.policy), allocator)
            return rss, time.perf_counter() - start

        for allocator in args.allocators:
            floors[allocator], _ = peak("floor", allocator, "--trainer.limit_train_batches=0")
            for k in args.members:
                for recompute in (True, False) if k > 1 else (True,):
                    extra = [f"--model.lora.members={k}", f"--model.lora.recompute_members={str(recompute).lower()}"]
                    rows.append((allocator, k, recompute, *peak(f"k{k}-{recompute}", allocator, *extra)))
    gib = 2**30
    what = args.policy or "a SmolLM2-135M-shaped Llama (~106M parameters)"
    print(f"\nLoRA r=8 ensembles on {what}, float32, CPU, 8 pairs a step: peak RSS per process")
    print(", ".join(f"a fit without training steps peaks at {rss / gib:.2f} GiB ({a})" for a, rss in floors.items()))
    print(
        f"{'malloc':>9} | {'K':>2} | {'recompute':>9} | {'peak':>9} | {'peak / K=1':>10} | {'above the model':>15} | "
        f"{'ratio':>5} | {'wall':>6}"
    )
    for allocator, k, recompute, rss, wall in rows:
        base = next(r for a, kk, _, r, _ in rows if a == allocator and kk == 1)
        floor = floors[allocator]
        above = (rss - floor) / max(base - floor, 1)
        print(
            f"{allocator:>9} | {k:>2} | {'yes' if recompute else 'no':>9} | {rss / gib:5.2f} GiB | "
            f"{rss / base:10.2f} | {(rss - floor) / gib:11.2f} GiB | {above:5.2f} | {wall:5.0f} s"
        )


def fit_table(args) -> None:
    from bpo_lightning.tasks.reviews import ensure_sft

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ensure_sft(Path(tmp) / "sft", steps=1, seed=0)  # only its tokenizer is used
        rows = []
        for name, lora in (("full fine-tuning", False), ("LoRA r=8", True)):
            run = Path(tmp) / name.split()[0]
            fit = measure(command(run, tokenizer, lora, policy=args.policy))
            size = (run / "checkpoints" / "phase-2.ckpt").stat().st_size
            again = Path(tmp) / f"{run.name}-resume"
            shutil.copytree(run, again, symlinks=True)
            resume = measure(
                command(
                    again, tokenizer, lora, f"--ckpt_path={again / 'checkpoints' / 'phase-1.ckpt'}", policy=args.policy
                )
            )
            rows.append((name, fit, resume, size))
    gib, mib = 2**30, 2**20
    what = args.policy or "a SmolLM2-135M-shaped Llama (~106M parameters)"
    print(f"bpo fit on {what}, float32, CPU: peak RSS per process")
    print(f"{'policy':<18} | {'fit':>9} | {'resume':>9} | {'resume / fit':>12} | {'checkpoint':>10}")
    for name, fit, resume, size in rows:
        print(
            f"{name:<18} | {fit / gib:6.2f} GiB | {resume / gib:6.2f} GiB | {resume / fit:12.2f} | "
            f"{size / mib:6.1f} MiB"
        )


if __name__ == "__main__":
    main()
