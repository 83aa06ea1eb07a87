"""Peak memory of `bpo fit` on a SmolLM2-135M-shaped policy: full fine-tuning and LoRA, a fit and its resume.

The policy is a randomly initialised Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
MLP 1536; the embedded task's 768-token vocabulary instead of 49,152, so the task's tokenizer fits it: ~106M
parameters) in float32 on CPU, trained on the embedded review task with the quickstart's settings, shrunk: 2 phases
of 8 prompts, 32 new tokens, no held-out evaluation. Each case runs in a fresh process; its peak RSS is the
process's ``ru_maxrss``. "resume" restarts the same run from its phase-1 checkpoint and trains phase 2 again.

    python benchmarks/model_memory.py            # ~5 min on 2 CPU cores

``--policy FOLDER`` measures a real checkpoint instead, e.g. the offline SmolLM2-135M-Instruct (docs/real-world.md;
134.5M parameters, 49,152-token vocabulary), with its own tokenizer and no BOS:

    python benchmarks/model_memory.py --policy ~/.cache/bpo-lightning/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
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


def case(argv: list[str]) -> None:
    from bpo_lightning.cli import main

    main(argv)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(argv: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(argv)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="a model folder to measure instead of the SmolLM2-135M-shaped random Llama")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case(json.loads(args.case))
        return
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
