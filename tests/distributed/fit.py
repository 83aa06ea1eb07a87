"""A tiny BPO fit on 1 or N CPU processes (gloo), run by tests as a subprocess.

Lightning's CPU launcher re-executes ``sys.argv`` for every extra process, so multi-process fits cannot run inside
pytest itself. Each process writes what it observed into ``--out``:

- ``calls.rank<r>.json``: every (prompt, response) the annotator scored on that process (appended by a resumed run);
- ``initial.pt`` (process 0): the trainable weights before the first step;
- ``weights.pt`` (process 0): the final policy weights (the trainable tensors; gathered under ZeRO-3);
- ``stats.json`` (process 0): per-phase ``PhaseStats`` and the number of optimizer steps;
- ``hooks.rank<r>.json``: the observation hooks that fired on that process.

    python tests/distributed/fit.py --sft DIR --out DIR --strategy ddp --devices 2
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_deepspeed import CPUDeepSpeedStrategy  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from bpo_lightning import EMA, Frozen, HardSync, hookimpl  # noqa: E402
from bpo_lightning.annotation import Annotator  # noqa: E402
from bpo_lightning.data import OnlineDataModule  # noqa: E402
from bpo_lightning.evaluation import Evaluation, PhaseReport  # noqa: E402
from bpo_lightning.lora import LoRA  # noqa: E402
from bpo_lightning.module import BPOModule  # noqa: E402
from bpo_lightning.plugins import get_plugins  # noqa: E402
from bpo_lightning.policy import FromConfig, Pretrained  # noqa: E402
from bpo_lightning.prompts import ReviewPrompts  # noqa: E402
from bpo_lightning.sampling import GenerateSampler  # noqa: E402
from bpo_lightning.tasks import reviews  # noqa: E402


class CountingAnnotator(Annotator):
    """The review task's gold reward, recording every (prompt, response) it scores in ``log`` (a resumed run adds
    to it); with ``kill_at`` it kills the whole job (every process, SIGKILL) at its ``kill_at``-th invocation."""

    def __init__(self, log: Path, kill_at: int = 0) -> None:
        self.log, self.kill_at, self.invocations = log, kill_at, 0
        self.calls: list[list[str]] = json.loads(log.read_text()) if log.exists() else []

    def score(self, prompts, responses):
        self.invocations += 1
        if self.invocations == self.kill_at:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        self.calls.extend([p, r] for p, r in zip(prompts, responses, strict=True))
        self.log.write_text(json.dumps(self.calls))
        return [reviews.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]

    @property
    def identity(self) -> str:
        return "CountingAnnotator:gold"


class HookLog:
    def __init__(self) -> None:
        self.events: list[list] = []

    @hookimpl
    def on_phase_start(self, phase):
        self.events.append(["on_phase_start", phase])

    @hookimpl
    def on_pairs_ready(self, phase, pairs):
        self.events.append(["on_pairs_ready", phase, len(pairs)])


class SaveInitial(L.Callback):
    """The trainable weights before the first step, gathered (every process takes part), saved by process 0."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, module):
        state = module.trainable_state()
        if trainer.global_rank == 0 and not self.path.exists():
            torch.save(state, self.path)


def strategy(name: str):
    if name == "ddp":
        return "ddp"
    if name == "single":
        return "auto"
    stage = {"zero2": 2, "zero3": 3}[name]
    return CPUDeepSpeedStrategy(stage=stage, process_group_backend="gloo")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "zero2", "zero3"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--behavior", default="HardSync", choices=["HardSync", "Frozen", "EMA"])
    parser.add_argument("--members", type=int, default=0, help="LoRA ensemble members (0: full fine-tuning)")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kill-at", type=int, default=0, help="process 0 kills the job at its N-th annotation")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--gather-for-sampling", action="store_true", help="ZeRO-3: sample with whole weights")
    parser.add_argument("--from-config", action="store_true", help="a randomly initialised policy (FromConfig)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.kill_at and os.environ.get("LOCAL_RANK", "0") != "0":
        args.kill_at = 0  # process 0 kills the job
    hooks = HookLog()
    get_plugins().manager.register(hooks)
    behavior = {"HardSync": HardSync(), "Frozen": Frozen(), "EMA": EMA(decay=0.5)}[args.behavior]
    lora = LoRA(r=4, alpha=8, members=args.members) if args.members else None
    source = Pretrained(args.sft)
    if args.from_config:
        tiny = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 768}
        source = FromConfig(config=tiny, tokenizer=args.sft, seed=1)
    module = BPOModule(policy=source, behavior=behavior, lora=lora, lr=args.lr,
                       evaluation=Evaluation(kl_samples=1 if args.eval_prompts else 0),
                       gather_for_sampling=args.gather_for_sampling)  # fmt: skip
    annotator = CountingAnnotator(out / f"calls.rank{os.environ.get('LOCAL_RANK', '0')}.json", args.kill_at)
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=annotator,
        eval_prompts=ReviewPrompts("eval", limit=args.eval_prompts) if args.eval_prompts else None,
        sampler=GenerateSampler(max_new_tokens=12, batch_size=8, progress=False),
        budget=args.budget,
        num_phases=args.phases,
        batch_size=args.batch_size,
        seed=0,
        eval_batch_size=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy(args.strategy),
        precision=args.precision,
        max_epochs=args.phases,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=str(out / "run"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[SaveInitial(out / "initial.pt"), ModelCheckpoint(dirpath=out / "run" / "ckpt", save_last=True),
                   *([PhaseReport(plots=False)] if args.eval_prompts else [])],
        limit_val_batches=None if args.eval_prompts else 0,
    )
    trainer.fit(module, datamodule=data, ckpt_path="last" if args.resume else None)

    rank = trainer.global_rank
    (out / f"hooks.rank{rank}.json").write_text(json.dumps(hooks.events))
    state = module.trainable_state()  # every process takes part (ZeRO-3 gathers)
    if rank == 0:
        torch.save(state, out / "weights.pt")
        stats = {p: vars(s) for p, s in data.stats.items()}
        (out / "stats.json").write_text(json.dumps({"phases": stats, "steps": trainer.global_step,
                                                    "evaluation": module.last_evaluation}))  # fmt: skip


if __name__ == "__main__":
    main()
