"""A tiny BPO fit on 1 or N CPU processes (gloo), run by tests as a subprocess.

Lightning's CPU launcher re-executes ``sys.argv`` for every extra process, so multi-process fits cannot run inside
pytest itself. Each process writes what it observed into ``--out``:

- ``calls.rank<r>.json``: every (prompt, response) the annotator scored on that process (appended by a resumed run);
- ``judge.rank<r>.json``: with ``--evaluator judge``, every (prompt, response A, response B) the judge was asked;
- ``initial.pt`` (process 0): the trainable weights before the first step;
- ``weights.pt`` (process 0): the final policy weights (the trainable tensors; gathered under ZeRO-3);
- ``stats.json`` (process 0): per-phase ``PhaseStats`` and the number of optimizer steps;
- ``hooks.rank<r>.json``: the observation hooks that fired on that process.

    python tests/distributed/fit.py --sft DIR --out DIR --strategy ddp --devices 2
"""

import argparse
import faulthandler
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the hang guard asks every process where it waits
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_deepspeed import CPUDeepSpeedStrategy  # noqa: E402

from bpo_lightning import EMA, Frozen, HardSync, hookimpl  # noqa: E402
from bpo_lightning.annotation import Annotator, RuleAnnotator  # noqa: E402
from bpo_lightning.checkpoints import PhaseCheckpoint  # noqa: E402
from bpo_lightning.data import OnlineDataModule  # noqa: E402
from bpo_lightning.evaluation import Evaluation  # noqa: E402
from bpo_lightning.files import atomic_write  # noqa: E402
from bpo_lightning.judge import LLMJudge  # noqa: E402
from bpo_lightning.logs import RunCSVLogger  # noqa: E402
from bpo_lightning.lora import LoRA  # noqa: E402
from bpo_lightning.module import BPOModule  # noqa: E402
from bpo_lightning.plugins import get_plugins  # noqa: E402
from bpo_lightning.policy import FromConfig, Pretrained  # noqa: E402
from bpo_lightning.prompts import ReviewPrompts  # noqa: E402
from bpo_lightning.reporting import PhaseReport  # noqa: E402
from bpo_lightning.sampling import GenerateSampler  # noqa: E402
from bpo_lightning.tasks import reviews  # noqa: E402


def sampler(name: str, batch_size: int = 8):
    """The data sampler: transformers' ``generate`` or a vLLM engine (same settings)."""
    if name == "vllm":
        from bpo_lightning.engine import VLLMSampler

        return VLLMSampler(max_new_tokens=12, batch_size=batch_size, progress=False, kv_cache_gib=0.25)
    return GenerateSampler(max_new_tokens=12, batch_size=batch_size, progress=False)


class CountingAnnotator(Annotator):
    """The review task's gold reward, one paid answer at a time (``score_iter``): every (prompt, response) it scores
    is recorded in ``log`` before its score is handed over (a resumed run adds to it). With ``kill_at`` it kills the
    whole job (every process, SIGKILL) at its ``kill_at``-th call; with ``kill_item`` right before paying for its
    ``kill_item``-th answer."""

    def __init__(self, log: Path, kill_at: int = 0, kill_item: int = 0, delay: float = 0) -> None:
        self.log, self.kill_at, self.kill_item, self.invocations, self.items = log, kill_at, kill_item, 0, 0
        self.delay = delay
        self.calls: list[list[str]] = json.loads(log.read_text()) if log.exists() else []

    def score(self, prompts, responses):
        return [score for group in self.score_iter(prompts, responses) for _, score in group]

    kill_self = 0  # SIGKILL to this process alone at its ``kill_self``-th call

    def score_iter(self, prompts, responses):
        self.invocations += 1
        if self.invocations == self.kill_at:
            die()
        if self.invocations == self.kill_self:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.delay and self.invocations <= 2:  # a judge slower than the process group's timeout, twice
            time.sleep(self.delay)
        for k, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            self.items += 1
            if self.items == self.kill_item:
                die()
            with PAYING:  # from "paid" to "stored": the caller stores the answer before it asks for the next one
                self.calls.append([prompt, response])
                atomic_write(self.log, json.dumps(self.calls))  # paid: recorded (whole, whenever a kill comes) first
                yield [(k, reviews.gold_reward(prompt, response))]

    @property
    def identity(self) -> str:
        return "CountingAnnotator:gold"


class CountingJudge(LLMJudge):
    """Prefers the longer response, one request at a time: each (prompt, response A, response B) it is asked is
    recorded in ``log`` before its reply is handed over; with ``kill_at`` it kills the job right before its
    ``kill_at``-th request."""

    def __init__(self, log: Path, kill_at: int = 0) -> None:
        super().__init__("longer", template="{prompt}\n[A]{response_a}\n[B]{response_b}")
        self.log, self.kill_at, self.sent = log, kill_at, 0
        self.asked: list[list[str]] = json.loads(log.read_text()) if log.exists() else []

    def _complete_iter(self, texts):
        for k, text in enumerate(texts):
            self.sent += 1
            if self.sent == self.kill_at:
                die()
            prompt, rest = text.split("\n[A]", 1)
            a, b = rest.split("\n[B]", 1)
            with PAYING:
                self._count("requests")
                self.asked.append([prompt, a, b])
                atomic_write(self.log, json.dumps(self.asked))
                yield k, "Preferred: A" if len(a) >= len(b) else "Preferred: B"


# Held by the annotator from the moment an answer is paid for until the caller has stored it (it asks for the next
# answer only then). A kill point elsewhere (e.g. sampling the next block while a worker thread annotates) waits for
# it: the only answers a crash can lose are those inside this window of a few microseconds, between the annotator's
# reply and its commit, which no design can close.
PAYING = threading.RLock()


def die() -> None:
    """SIGKILL to the whole job (every process of the fit), outside an answer's paid-to-stored window."""
    PAYING.acquire(timeout=60)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def nth(n: int):
    """A function that is true at its ``n``-th call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n

    return hit


def install_kill(point: str, n: int, module: BPOModule, trainer_callbacks: list) -> None:
    """Kill the job at a named point of a fit, the ``n``-th time it is reached:

    ``sample`` (a block's sampling), ``append`` (half-way through appending rows to samples.jsonl), ``score`` (the
    behavior/reference log-probs of a phase's pairs), ``pairs`` (pairs.jsonl written, not yet renamed into place),
    ``step`` (a training step), ``evaluate`` (an evaluation batch), ``checkpoint`` (half-way through writing a
    checkpoint), ``between`` (phases: phase ``n + 1`` about to start), ``insert`` (the annotation cache's INSERT
    done, its COMMIT not). ``annotate`` is the annotator's ``kill_item``, ``rule`` the rule function's ``n``-th call
    (``--annotator rule``), ``judge`` the evaluator's ``n``-th request (``--evaluator judge``).
    """
    import bpo_lightning.sampling as sampling
    import bpo_lightning.store as store

    hit = nth(n)
    if point == "sample":
        sample = sampling.GenerateSampler.sample
        sampling.GenerateSampler.sample = lambda self, *a, **k: die() if hit() else sample(self, *a, **k)
    elif point == "append":
        append = store.PhaseStore.append_samples

        def torn_append(self, rows):
            if hit():
                with self.samples_path.open("a") as f:
                    f.write(json.dumps(rows[0].to_json())[:40])
                    f.flush()
                die()
            append(self, rows)

        store.PhaseStore.append_samples = torn_append
    elif point == "score":
        score = type(module).score_records
        type(module).score_records = lambda self, records: die() if hit() else score(self, records)
    elif point == "pairs":
        replace = os.replace

        def replace_or_die(src, dst, *a, **k):
            if str(dst).endswith(".pairs.jsonl") and hit():
                die()
            return replace(src, dst, *a, **k)

        os.replace = replace_or_die
    elif point in ("step", "evaluate"):

        class Kill(L.Callback):
            def on_train_batch_start(self, *args):
                if point == "step" and hit():
                    die()

            def on_validation_batch_start(self, *args):
                if point == "evaluate" and hit():
                    die()

        trainer_callbacks.append(Kill())
    elif point == "checkpoint":
        save = torch.save

        def torn_save(obj, f, *a, **k):
            if hasattr(f, "write") and hit():
                buffer = io.BytesIO()
                save(obj, buffer, *a, **k)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                die()
            return save(obj, f, *a, **k)

        torch.save = torn_save
    elif point == "between":
        start = type(module).start_phase
        type(module).start_phase = lambda self, phase: die() if phase == n else start(self, phase)
    elif point == "insert":
        import bpo_lightning.cache as cache

        put = cache.AnnotationCache.put

        def put_then_die(self, *args, **kwargs):
            if hit():
                self._db = InsertThenDie(self._db)
            put(self, *args, **kwargs)

        cache.AnnotationCache.put = put_then_die
    elif point not in ("annotate", "rule", "judge"):
        raise SystemExit(f"unknown kill point {point!r}")


class InsertThenDie:
    """An SQLite connection that runs the next transaction's statements and kills the job instead of committing."""

    def __init__(self, db) -> None:
        self.db = db

    def __getattr__(self, name):
        return getattr(self.db, name)

    def commit(self) -> None:
        die()


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


class DieAtStep(L.Callback):
    """SIGKILL to this process alone as its ``step``-th training step starts (the others wait for it in the step's
    gradient all-reduce)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class CollectiveTimeout(L.Callback):
    """The process group's timeout for collectives, set once the group is up: a short one given to the strategy
    would also bound the rendezvous, which a loaded machine can take longer than a few seconds to finish."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage) -> None:
        from datetime import timedelta

        from torch.distributed.distributed_c10d import _set_pg_timeout

        if torch.distributed.is_initialized():
            _set_pg_timeout(timedelta(seconds=self.seconds))


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
    parser.add_argument("--kill", default="", help="POINT:N, process 0 kills the job there (see install_kill)")
    parser.add_argument("--log", action="store_true", help="metrics.csv in the run folder (RunCSVLogger)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--gather-for-sampling", action="store_true", help="ZeRO-3: sample with whole weights")
    parser.add_argument("--sampler", default="generate", choices=["generate", "vllm"], help="vllm: VLLMSampler")
    parser.add_argument("--from-config", action="store_true", help="a randomly initialised policy (FromConfig)")
    parser.add_argument("--annotator", default="counting", choices=["counting", "rule"], help="rule: RuleAnnotator")
    parser.add_argument("--evaluator", default="annotator", choices=["annotator", "judge"], help="judge: CountingJudge")
    parser.add_argument("--block", type=int, default=8, help="the sampler's batch_size (prompts per block)")
    parser.add_argument("--pg-timeout", type=float, default=0, help="collectives' timeout, seconds")
    parser.add_argument(
        "--slow", type=float, default=0, help="process 1's annotator waits this long at its first 2 calls"
    )
    parser.add_argument(
        "--one-dies", default="", help="annotate:N or step:N: process 1 alone is SIGKILLed at its N-th call or step"
    )
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        args.kill_at, args.kill = 0, ""  # process 0 kills the job
    point, _, n = args.kill.partition(":")
    hooks = HookLog()
    get_plugins().manager.register(hooks)
    behavior = {"HardSync": HardSync(), "Frozen": Frozen(), "EMA": EMA(decay=0.5)}[args.behavior]
    lora = LoRA(r=4, alpha=8, members=args.members) if args.members else None
    source = Pretrained(args.sft)
    if args.from_config:
        tiny = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 768}
        source = FromConfig(config=tiny, tokenizer=args.sft, seed=1)
    module = BPOModule(
        policy=source,
        behavior=behavior,
        lora=lora,
        lr=args.lr,
        evaluation=Evaluation(kl_samples=1 if args.eval_prompts else 0),
        gather_for_sampling=args.gather_for_sampling,
    )
    rank_name = os.environ.get("LOCAL_RANK", "0")
    annotator = CountingAnnotator(
        out / f"calls.rank{rank_name}.json",
        args.kill_at,
        kill_item=int(n) if point == "annotate" else 0,
        delay=args.slow if rank_name == "1" else 0,
    )
    if args.annotator == "rule":  # the default annotator, with a rule function that records its calls
        os.environ["BPO_TEST_CALL_LOG"] = str(out / f"calls.rank{rank_name}.json")
        os.environ["BPO_TEST_KILL_CALL"] = n if point == "rule" else "0"
        annotator = RuleAnnotator("counted_rule:gold")
    judge = None
    if args.evaluator == "judge":
        judge = CountingJudge(out / f"judge.rank{rank_name}.json", kill_at=int(n) if point == "judge" else 0)
    checkpoint = PhaseCheckpoint(
        dirpath=out / "run" / "ckpt",
        filename="phase-{phase}",
        save_last="link",
        save_top_k=-1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    callbacks = [SaveInitial(out / "initial.pt"), *([PhaseReport(plots=False)] if args.eval_prompts else [])]
    callbacks.append(checkpoint)
    if args.pg_timeout:
        callbacks.append(CollectiveTimeout(args.pg_timeout))
    if args.one_dies and rank_name == "1":
        where, _, at = args.one_dies.partition(":")
        if where == "step":
            callbacks.append(DieAtStep(int(at)))
        else:
            annotator.kill_self = int(at)
    if point:
        install_kill(point, int(n), module, callbacks)
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=annotator,
        evaluator=judge,
        eval_prompts=ReviewPrompts("eval", limit=args.eval_prompts) if args.eval_prompts else None,
        sampler=sampler(args.sampler, args.block),
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
        logger=RunCSVLogger(save_dir=str(out / "run"), name="", version="") if args.log else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        limit_val_batches=None if args.eval_prompts else 0,
    )
    trainer.fit(module, datamodule=data, ckpt_path="last" if args.resume else None)

    rank = trainer.global_rank
    (out / f"hooks.rank{rank}.json").write_text(json.dumps(hooks.events))
    state = module.trainable_state()  # every process takes part (ZeRO-3 gathers)
    if rank == 0:
        torch.save(state, out / "weights.pt")
        stats = {p: vars(s) for p, s in data.stats.items()}
        (out / "stats.json").write_text(
            json.dumps({"phases": stats, "steps": trainer.global_step, "evaluation": module.last_evaluation})
        )


if __name__ == "__main__":
    main()
