"""The online preference data: one collection phase per Lightning epoch.

``train_dataloader`` (called with ``reload_dataloaders_every_n_epochs=1`` at every epoch start, *before*
``on_train_epoch_start``) runs the phase's collection top to bottom:

    behavior update → sample → annotate → drop identical / tied / unscored → pairs → behavior log-probs → DataLoader

Each prompt of the fixed annotation budget is used once: the pool is shuffled once with the seed and split into
``num_phases`` consecutive blocks. The collection itself, split across processes, lives in ``collection``;
everything is written to ``<run_dir>/data`` as it is produced (see ``store``). ``data.batch_size`` is the *global*
number of pairs per optimizer step: with N processes each takes every N-th pair of the step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bpo_lightning.annotation import Annotator, PairwiseAnnotator
from bpo_lightning.batches import pair_batch, weighted_pair_batch
from bpo_lightning.cache import AnnotationCache
from bpo_lightning.collection import PhasePrompts, annotate, collect_phase, global_batches  # noqa: F401 (annotate)
from bpo_lightning.distributed import Ranks, agree_on_run_dir
from bpo_lightning.errors import InputError, RunError
from bpo_lightning.evaluation import EvaluationInputs, HeldOut
from bpo_lightning.files import lock_run_dir
from bpo_lightning.prompts import PromptSource
from bpo_lightning.sampling import GenerateSampler, Sampler
from bpo_lightning.store import PhaseStore
from bpo_lightning.types import PhaseResult, PhaseStats, PhaseSteps


class OnlineDataModule(L.LightningDataModule):
    """Regenerates preference pairs from the behavior LLM at every phase.

    Args:
        prompts: the prompt pool of the online phases.
        annotator: labels each prompt's responses (higher score = chosen).
        eval_prompts: held-out prompts with reference answers: validation (``bpo validate``, during fit).
        test_prompts: held-out prompts with reference answers for ``bpo test``; defaults to ``eval_prompts``.
        evaluator: scores evaluation responses against the references; defaults to ``annotator``.
        max_eval_prompts: evaluate on at most this many of ``eval_prompts`` / ``test_prompts``.
        eval_batch_size: held-out prompts per evaluation batch (one ``generate`` call).
        sampler: draws responses from the behavior LLM; defaults to ``GenerateSampler()``.
        budget: number of prompts annotated over the whole run (default: the whole pool).
        num_phases: F, the number of collection phases; set ``trainer.max_epochs`` to the same value.
        batch_size: preference pairs per optimizer step, over all processes (each process takes its share).
        seed: shuffles the pool once and seeds sampling.
        run_dir: where phase data is written; defaults to ``trainer.default_root_dir``.
        annotation_cache: SQLite file of cached annotator scores; ``auto`` is ``<run_dir>/annotations.sqlite``, a
            shared path reuses scores across runs. ``null`` shares nothing with other runs: paid scores are then
            kept only in the run's ``data/annotations.journal.sqlite``, so that a resume never pays for them twice.
        min_pairs: the fewest pairs a phase may keep; a phase with fewer stops the run, naming the phase and why its
            prompts were dropped (a phase that trains on nothing is an error, not a success).
        pipeline: annotate each block of samples in a worker thread while the next block is sampled (the same
            results and files as one after the other).
    """

    def __init__(
        self,
        prompts: PromptSource,
        annotator: Annotator,
        eval_prompts: PromptSource | None = None,
        test_prompts: PromptSource | None = None,
        evaluator: Annotator | None = None,
        max_eval_prompts: int | None = None,
        eval_batch_size: int = 64,
        sampler: Sampler | None = None,
        budget: int | None = None,
        num_phases: int = 2,
        batch_size: int = 16,
        seed: int = 0,
        run_dir: str | None = None,
        annotation_cache: str | None = "auto",
        min_pairs: int = 1,
        pipeline: bool = True,
    ) -> None:
        super().__init__()
        problems = [
            f"data.{k} must be >= 1, got {v}"
            for k, v in [
                ("num_phases", num_phases),
                ("batch_size", batch_size),
                ("budget", budget or 1),
                ("eval_batch_size", eval_batch_size),
                ("max_eval_prompts", max_eval_prompts or 1),
                ("min_pairs", min_pairs),
            ]
            if v < 1
        ]
        if budget is not None and budget >= 1 and num_phases > budget:
            problems.append(f"data.num_phases ({num_phases}) exceeds data.budget ({budget}): each phase needs a prompt")
        if problems:
            raise InputError("; ".join(problems))
        if isinstance(annotator, PairwiseAnnotator) and sampler is not None and sampler.num_samples != 2:
            raise InputError("data.sampler.init_args.num_samples must be 2 with a pairwise annotator (a judge)")
        self.prompts, self.eval_prompts, self.test_prompts = prompts, eval_prompts, test_prompts
        self.max_eval_prompts, self.eval_batch_size = max_eval_prompts, eval_batch_size
        self.annotator = annotator
        self.evaluator = evaluator or annotator
        self.sampler = sampler or GenerateSampler()
        self.budget, self.num_phases, self.batch_size, self.seed = budget, num_phases, batch_size, seed
        self._run_dir = run_dir
        self.annotation_cache = annotation_cache
        self.min_pairs = min_pairs
        self.pipeline = pipeline
        self._cache: AnnotationCache | None = None
        self.pool: list[dict] | None = None
        self.eval_rows: list[dict] = []
        self.test_rows: list[dict] | None = None
        self.phases_collected = 0  # cursor: phases whose pairs are complete
        self.stats: dict[int, PhaseStats] = {}

    @property
    def run_dir(self) -> Path:
        return Path(self._run_dir or self.trainer.default_root_dir)

    def setup(self, stage: str) -> None:
        if self.eval_prompts is not None and not self.eval_rows:
            self.eval_rows = self.eval_prompts.load("data.eval_prompts", require_reference=True)
            self.eval_rows = self.eval_rows[: self.max_eval_prompts]
        if stage == "test" and self.test_rows is None:
            source, key = (
                (self.test_prompts, "data.test_prompts")
                if self.test_prompts
                else (self.eval_prompts, "data.eval_prompts")
            )
            self.test_rows = [] if source is None else source.load(key, require_reference=True)[: self.max_eval_prompts]
        if stage == "fit" and self.pool is None:
            self._load_pool()
            key = "data.run_dir" if self._run_dir else "trainer.default_root_dir"
            if self.trainer is None or self.trainer.is_global_zero:  # files a killed run was writing (never read)
                lock_run_dir(self.run_dir, key)
                for folder in (self.run_dir, self.run_dir / "data", self.run_dir / "evaluations"):
                    for leftover in folder.glob("*.tmp"):
                        leftover.unlink(missing_ok=True)
            if self.trainer is not None:  # before Lightning restores a checkpoint on each process from its own view
                agree_on_run_dir(self.run_dir, Ranks.of(self.trainer), key, self.trainer.ckpt_path)
        if stage == "fit" and not self.eval_rows and self.trainer is not None:
            self.trainer.limit_val_batches = 0  # no held-out prompts: no evaluation during fit

    def on_exception(self, exception: BaseException) -> None:
        """A collective that lost another process of the job: say so in one line now, before Lightning's teardown
        (which may wait on the dead process, or be cut short by the launcher killing this one)."""
        from bpo_lightning.distributed import peer_failure

        message = peer_failure(exception)
        if message is not None and not getattr(exception, "_bpo_reported", False):
            print(f"bpo: error: {message}", file=sys.stderr, flush=True)
            exception._bpo_reported = True

    def teardown(self, stage: str) -> None:
        """Close the annotation cache when a fit, validation or test ends (it reopens on next use): its last
        connection folds SQLite's write-ahead log into the file then, not whenever the object is collected."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _load_pool(self) -> None:
        rows = self.prompts.load("data.prompts")
        budget = self.budget or len(rows)
        if budget > len(rows):
            raise InputError(f"data.budget ({budget}) exceeds the {len(rows)} usable prompts of data.prompts")
        if self.num_phases > budget:
            raise InputError(f"data.num_phases ({self.num_phases}) exceeds the {budget} prompts of the budget")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))[:budget]
        self.pool = [rows[i] for i in order.tolist()]

    @property
    def cache(self) -> AnnotationCache | None:
        """Where paid scores are kept as they arrive: the annotation cache, or without one (``null``) the run's own
        journal ``data/annotations.journal.sqlite``, which only a resume of this run reads."""
        if self._cache is None:
            if self.annotation_cache is None and self._run_dir is None and self.trainer is None:
                return None  # outside a run: nothing to keep
            if self.annotation_cache is None:
                path = self.run_dir / "data" / "annotations.journal.sqlite"
            else:
                path = self.run_dir / "annotations.sqlite" if self.annotation_cache == "auto" else self.annotation_cache
            self._cache = AnnotationCache(path)
        return self._cache

    def phase_indices(self, phase: int) -> range:
        """Pool positions of a phase's prompts: ``budget`` split into ``num_phases`` near-equal blocks."""
        size, extra = divmod(len(self.pool), self.num_phases)
        start = phase * size + min(phase, extra)
        return range(start, start + size + (phase < extra))

    def train_dataloader(self) -> DataLoader:
        phase = self.trainer.current_epoch
        if phase >= self.num_phases:
            raise InputError(
                f"trainer.max_epochs asks for phase {phase + 1}, but data.num_phases is {self.num_phases}: "
                "set both to the same value"
            )
        ranks = Ranks.of(self.trainer)
        module = self.trainer.lightning_module
        if module.policy is None:  # asked before the model exists (DeepSpeed, to guess a micro-batch size)
            return DataLoader([], batch_size=max(1, self.batch_size // ranks.world))
        behavior = module.behavior_llm(phase)  # π_β updated for this phase, right before it samples
        result = self.collect(phase, behavior)
        records = result.records
        plan = global_batches(len(records), self.batch_size, self.seed * 1000 + phase, ranks)
        pad, eos = behavior.tokenizer.pad_token_id, behavior.tokenizer.eos_token_id

        def collate(item: tuple[list[int], int]) -> dict[str, torch.Tensor]:
            mine, total = item
            if ranks.world == 1:
                return pair_batch([records[i] for i in mine], pad, eos, behavior.truncated_eos)
            return weighted_pair_batch(records, mine, total, ranks.world, pad, eos, behavior.truncated_eos)

        # batch_size=None: each item is one step's share; a DistributedSampler subclass, so Lightning keeps it. The
        # module reads the phase's result from the loader (PhaseSteps) when the phase's training starts.
        later = range(phase + 1, self.num_phases)
        steps = PhaseSteps(plan, result, tuple(math.ceil(len(self.phase_indices(p)) / self.batch_size) for p in later))
        return DataLoader(steps, batch_size=None, sampler=Shard(len(plan)), collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        if not self.eval_rows:
            raise InputError("bpo validate: data.eval_prompts is not set (held-out prompts with references)")
        return self._eval_loader(self.eval_rows)

    def test_dataloader(self) -> DataLoader:
        if not self.test_rows:
            raise InputError("bpo test: set data.test_prompts or data.eval_prompts (held-out prompts with references)")
        return self._eval_loader(self.test_rows)

    def _eval_loader(self, rows: list[dict], rank: int | None = None, world: int | None = None) -> DataLoader:
        """``(index, row)`` batches in order, this process's share of whole batches (``Shard``; unlike Lightning's
        default distributed sampler, no prompt is repeated and counted twice). With several processes every process
        gets as many batches: one short ends with a stand-in ``(-1, row)`` that is answered, for the collective
        forwards (ZeRO-3) and metric reductions, and then discarded. ``rank``/``world`` default to the trainer's."""
        if rank is None or world is None:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        shard = Shard(len(rows), rank, world, pad=world > 1, block=self.eval_batch_size)
        items = HeldOut([*enumerate(rows), (-1, rows[0])], self.evaluation_inputs)
        return DataLoader(items, batch_size=self.eval_batch_size, collate_fn=list, sampler=shard)

    def evaluation_inputs(self) -> EvaluationInputs:
        """What the held-out prompts are evaluated with: the sampler, the evaluator and annotator, the cache."""
        run_dir = self.run_dir if self._run_dir or self.trainer is not None else None
        return EvaluationInputs(self.sampler, self.evaluator, self.annotator, self.cache, run_dir)

    def eval_batches(self, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, dict]]]:
        """This process's share of the validation prompts as ``(index, row)`` batches (outside Lightning's loops),
        the same share ``val_dataloader`` gives."""
        return list(self._eval_loader(self.eval_rows, rank, world_size))

    def collect(self, phase: int, behavior) -> PhaseResult:
        """Build (or reload) one phase's preference pairs from π_β (``behavior``, a ``collection.BehaviorLLM``),
        split across processes (``collection``)."""
        trainer = self.trainer
        prompts = PhasePrompts(phase, self.pool, self.phase_indices(phase), self.seed)
        store = PhaseStore(self.run_dir / "data", phase)
        result = collect_phase(prompts, behavior, self.sampler, self.annotator, store, Ranks.of(trainer),
                               cache=self.cache, pipeline=self.pipeline,
                               stop=lambda: bool(getattr(trainer, "received_sigterm", False)))  # fmt: skip
        if len(result.records) < self.min_pairs:
            raise RunError(too_few_pairs(result.stats, self.min_pairs))
        self.stats[phase] = result.stats
        self.phases_collected = max(self.phases_collected, phase + 1)
        return result

    def state_dict(self) -> dict:
        return {"phases_collected": self.phases_collected}

    def load_state_dict(self, state: dict) -> None:
        self.phases_collected = state["phases_collected"]


class Shard(DistributedSampler):
    """This process's share of ``n`` held-out items: blocks of ``block`` consecutive positions, block ``b`` on
    process ``b mod world_size``, in order and without repeats, so every prompt is evaluated exactly once and a
    batch (one block) is the same batch — the same seeded samples — on any number of processes. A
    ``DistributedSampler``, so Lightning keeps it as it is.

    With ``pad``, every process gets as many blocks: a process one block short ends with position ``n`` (a
    stand-in item)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, pad: bool = False, block: int = 1) -> None:
        self.n, self.rank, self.num_replicas, self.pad, self.block = n, rank, world_size, pad, block
        self.epoch = 0

    def __iter__(self):
        starts = range(self.rank * self.block, self.n, self.num_replicas * self.block)
        own = [i for start in starts for i in range(start, min(start + self.block, self.n))]
        blocks = -(-self.n // self.block)
        short = self.pad and len(starts) < -(-blocks // self.num_replicas)
        return iter(own + [self.n] * short)

    def __len__(self) -> int:
        return sum(1 for _ in iter(self))


_CAUSES = {
    "annotator_nan": "the annotator gave no score: is it reachable, and does it return numbers? (a judge whose two "
    "orders disagree, e.g. from position bias, gives no verdict either)",
    "tie": "every pair tied: an annotator too coarse to separate the two responses, or a judge that always prefers "
    "one position?",
    "identical": "the two responses were identical: sampling too cold (temperature, top_k) or max_new_tokens too "
    "small?",
}


def too_few_pairs(stats: PhaseStats, minimum: int) -> str:
    """The error of a phase that kept fewer than ``minimum`` pairs, with the drop reasons and their likely cause."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.dropped.items(), key=lambda kv: -kv[1]))
    text = (
        f"phase {stats.phase + 1} kept {stats.kept} pairs of {stats.prompts} prompts, fewer than data.min_pairs "
        f"({minimum}); dropped: {reasons or 'none'}"
    )
    if stats.dropped:
        main = max(stats.dropped, key=stats.dropped.get)
        text += f". Likely cause: {_CAUSES.get(main, main)}"
    return text + ". The phase's rows are saved in data/; fix the cause and rerun with another run directory."
