"""The online preference data: one collection phase per Lightning epoch.

``train_dataloader`` (called with ``reload_dataloaders_every_n_epochs=1`` at every epoch start, *before*
``on_train_epoch_start``) runs the phase's collection top to bottom:

    behavior update → sample → annotate → drop identical / tied / unscored → pairs → behavior log-probs → DataLoader

Each prompt of the fixed annotation budget is used once: the pool is shuffled once with the seed and split into
``num_phases`` consecutive blocks. Everything is written to ``<run_dir>/data`` as it is produced (see ``store``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bpo_lightning.annotation import Annotator, JoinedPairs, PairwiseAnnotator
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.logprobs import right_padded
from bpo_lightning.plugins import get_plugins
from bpo_lightning.prompts import PromptSource, model_input
from bpo_lightning.sampling import GenerateSampler, Sampler, Samples
from bpo_lightning.store import PhaseStore
from bpo_lightning.types import PhaseStats, PreferenceRecord


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
        batch_size: preference pairs per optimisation step.
        seed: shuffles the pool once and seeds sampling.
        run_dir: where phase data is written; defaults to ``trainer.default_root_dir``.
        annotation_cache: SQLite file of cached annotator scores; ``auto`` is ``<run_dir>/annotations.sqlite``, a
            shared path reuses scores across runs, ``null`` disables caching.
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
    ) -> None:
        super().__init__()
        problems = [f"data.{k} must be >= 1, got {v}" for k, v in [("num_phases", num_phases),
                    ("batch_size", batch_size), ("budget", budget or 1), ("eval_batch_size", eval_batch_size),
                    ("max_eval_prompts", max_eval_prompts or 1)] if v < 1]  # fmt: skip
        if budget is not None and budget >= 1 and num_phases > budget:
            problems.append(f"data.num_phases ({num_phases}) exceeds data.budget ({budget}): each phase needs a prompt")
        if problems:
            raise ValueError("; ".join(problems))
        if isinstance(annotator, PairwiseAnnotator) and getattr(sampler, "num_samples", 2) != 2:
            raise ValueError("data.sampler.init_args.num_samples must be 2 with a pairwise annotator (a judge)")
        self.prompts, self.eval_prompts, self.test_prompts = prompts, eval_prompts, test_prompts
        self.max_eval_prompts, self.eval_batch_size = max_eval_prompts, eval_batch_size
        self.annotator = annotator
        self.evaluator = evaluator or annotator
        self.sampler = sampler or GenerateSampler()
        self.budget, self.num_phases, self.batch_size, self.seed = budget, num_phases, batch_size, seed
        self._run_dir = run_dir
        self.annotation_cache = annotation_cache
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
            source, key = (self.test_prompts, "data.test_prompts") if self.test_prompts else (self.eval_prompts, "")
            self.test_rows = [] if source is None else source.load(key, require_reference=True)[: self.max_eval_prompts]
        if stage == "fit" and self.pool is None:
            self._load_pool()
        if stage == "fit" and not self.eval_rows and self.trainer is not None:
            self.trainer.limit_val_batches = 0  # no held-out prompts: no evaluation during fit

    def _load_pool(self) -> None:
        rows = self.prompts.load("data.prompts")
        budget = self.budget or len(rows)
        if budget > len(rows):
            raise ValueError(f"data.budget ({budget}) exceeds the {len(rows)} usable prompts of data.prompts")
        if self.num_phases > budget:
            raise ValueError(f"data.num_phases ({self.num_phases}) exceeds the {budget} prompts of the budget")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))[:budget]
        self.pool = [rows[i] for i in order.tolist()]

    @property
    def cache(self) -> AnnotationCache | None:
        if self._cache is None and self.annotation_cache is not None:
            auto = self.annotation_cache == "auto"
            self._cache = AnnotationCache(self.run_dir / "annotations.sqlite" if auto else self.annotation_cache)
        return self._cache

    def phase_indices(self, phase: int) -> range:
        """Pool positions of a phase's prompts: ``budget`` split into ``num_phases`` near-equal blocks."""
        size, extra = divmod(len(self.pool), self.num_phases)
        start = phase * size + min(phase, extra)
        return range(start, start + size + (phase < extra))

    def train_dataloader(self) -> DataLoader:
        phase = self.trainer.current_epoch
        if phase >= self.num_phases:
            raise ValueError(
                f"trainer.max_epochs asks for phase {phase + 1}, but data.num_phases is {self.num_phases}: "
                "set both to the same value"
            )
        records = self.collect(phase)
        module = self.trainer.lightning_module
        return DataLoader(
            records,
            batch_size=self.batch_size,
            sampler=SeededShuffle(len(records), self.seed * 1000 + phase),
            collate_fn=lambda rows: pair_batch(rows, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id),
        )

    def val_dataloader(self) -> DataLoader:
        if not self.eval_rows:
            raise ValueError("bpo validate: data.eval_prompts is not set (held-out prompts with references)")
        return self._eval_loader(self.eval_rows)

    def test_dataloader(self) -> DataLoader:
        if not self.test_rows:
            raise ValueError("bpo test: set data.test_prompts or data.eval_prompts (held-out prompts with references)")
        return self._eval_loader(self.test_rows)

    def _eval_loader(self, rows: list[dict]) -> DataLoader:
        """``(index, row)`` batches in order, this process's share only (no padding, unlike Lightning's default
        distributed sampler, which would count repeated prompts twice)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return DataLoader(list(enumerate(rows)), batch_size=self.eval_batch_size, collate_fn=list,
                          sampler=Shard(len(rows), rank, world))  # fmt: skip

    def eval_batches(self, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, dict]]]:
        """This process's share of the validation prompts as ``(index, row)`` batches (outside Lightning's loops),
        the same share ``val_dataloader`` gives."""
        items = [(i, self.eval_rows[i]) for i in Shard(len(self.eval_rows), rank, world_size)]
        return [items[i : i + self.eval_batch_size] for i in range(0, len(items), self.eval_batch_size)]

    def collect(self, phase: int) -> list[PreferenceRecord]:
        """Build (or reload) one phase's preference pairs."""
        module = self.trainer.lightning_module
        version = module.start_phase(phase)  # the behavior snapshot happens here, right before sampling
        provenance = {
            "phase": phase,
            "behavior_version": version,
            "sampler": self.sampler.settings(),
            "annotator": self.annotator.identity,
            "seed": self.seed,
            "reference": module.reference,
        }
        store = PhaseStore(self.run_dir / "data", phase)
        store.check(provenance)
        hooks = get_plugins().hook
        if store.complete():
            records, stats = store.load_pairs()
        else:
            hooks.on_phase_start(phase=phase, behavior_version=version)
            records, stats = self._sample_and_annotate(phase, version, store)
            module.score_records(records)
            store.write_pairs(records, stats, provenance)
        self.stats[phase] = stats
        self.phases_collected = max(self.phases_collected, phase + 1)
        module.phase_stats = stats
        hooks.on_pairs_ready(phase=phase, pairs=tuple(records), stats=stats, run_dir=self.run_dir)
        return records

    def _sample_and_annotate(self, phase: int, version: int, store: PhaseStore):
        module = self.trainer.lightning_module
        done = store.load_samples()
        todo = [i for i in self.phase_indices(phase) if i not in done]
        seed = self.seed * 1_000_003 + phase * 10_007
        with module.behavior_weights():
            batches = self.sampler.sample_batches(
                module.policy, module.tokenizer, [model_input(self.pool[i]) for i in todo], seed=seed
            )
            for start, samples in batches:
                rows = annotate(self.annotator, todo[start:], self.pool, samples, self.cache)
                store.append_samples(rows)
                done.update((row["index"], row) for row in rows)
        stats = PhaseStats(phase)
        records = []
        for index in self.phase_indices(phase):
            row = done[index]
            stats.count(row["status"], row.get("annotated", 0), row.get("cached", 0))
            if row["status"] == "kept":
                records.append(record_from_row(row, phase, version))
        return records, stats

    def state_dict(self) -> dict:
        return {"phases_collected": self.phases_collected}

    def load_state_dict(self, state: dict) -> None:
        self.phases_collected = state["phases_collected"]


class Shard(DistributedSampler):
    """Positions ``rank, rank + world_size, …`` of ``n`` items, in order and without padding: every held-out prompt
    is evaluated exactly once across processes. A ``DistributedSampler``, so Lightning keeps it as it is."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.num_replicas = n, rank, world_size
        self.epoch = 0

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class SeededShuffle(torch.utils.data.Sampler[int]):
    """A permutation fixed by its seed, the same on every iteration: a resumed run sees the order of the
    uninterrupted one, however often Lightning iterates the loader."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


def annotate(
    annotator: Annotator, indices: list[int], pool: list[dict], samples: Samples, cache: AnnotationCache | None = None
) -> list[dict]:
    """Score each prompt's distinct responses in one annotator call; identical responses are not annotated, and
    responses the cache knows are not sent to the annotator."""
    rows, queries = [], []
    blocks = zip(indices, samples.prompt_ids, samples.responses, samples.response_ids, strict=False)
    for index, prompt_ids, texts, ids in blocks:  # `indices` may run past this block
        row = {"index": index, "prompt": pool[index]["prompt"], "prompt_ids": prompt_ids, "responses": texts,
               "response_ids": ids, "scores": [None] * len(texts), "status": "identical"}  # fmt: skip
        rows.append(row)
        distinct = _distinct(texts)
        if len(distinct) >= 2:
            row["status"] = None  # decided once scored
            queries.extend((row, i) for i in distinct)
    if isinstance(annotator, PairwiseAnnotator):
        queries, annotator = _as_pair_queries(queries), JoinedPairs(annotator)
    prompts = [row["prompt"] for row, _ in queries]
    responses = [
        row["responses"][i] if isinstance(i, int) else JoinedPairs.join(row["responses"][i[0]], row["responses"][i[1]])
        for row, i in queries
    ]
    scores, fresh = cached_score(annotator, cache, prompts, responses) if queries else ([], [])
    fresh = set(fresh)
    for k, ((row, i), score) in enumerate(zip(queries, scores, strict=True)):
        key = "annotated" if k in fresh else "cached"
        if isinstance(i, tuple):  # a verdict on the pair (first, second): +1, −1, 0 or NaN
            row["verdict"] = None if math.isnan(score) else float(score)
            score = math.nan if math.isnan(score) else (score > 0) - (score < 0)
            row["scores"][i[0]], row["scores"][i[1]] = (None, None) if math.isnan(score) else (score, -score)
            row[key] = row.get(key, 0) + 2
            continue
        row["scores"][i] = None if score is None or math.isnan(score) else float(score)  # NaN -> null in JSON
        row[key] = row.get(key, 0) + 1
    for row in rows:
        if row["status"] is None:
            row["status"] = _choose(row)
    return rows


def _as_pair_queries(queries: list[tuple[dict, int]]) -> list[tuple[dict, tuple[int, int]]]:
    """(row, response) queries → one (row, (first, second)) query per row, for a pairwise annotator."""
    pairs: dict[int, list] = {}
    for row, i in queries:
        pairs.setdefault(id(row), [row]).append(i)
    return [(row, (a, b)) for row, a, b in pairs.values()]


def _distinct(texts: list[str]) -> list[int]:
    return [i for i, text in enumerate(texts) if text not in texts[:i]]


def _choose(row: dict) -> str:
    """Best vs worst response by score (strict: equal scores carry no preference)."""
    scored = [(row["scores"][i], i) for i in _distinct(row["responses"])]
    if any(score is None for score, _ in scored):
        warnings.warn(f"annotator gave no score (NaN) for prompt #{row['index']}; the prompt is dropped", stacklevel=3)
        return "annotator_nan"
    (best, c), (worst, r) = max(scored), min(scored)
    if best == worst:
        return "tie"
    row["chosen"], row["rejected"] = c, r
    return "kept"


def record_from_row(row: dict, phase: int, version: int) -> PreferenceRecord:
    c, r = row["chosen"], row["rejected"]
    return PreferenceRecord(
        phase=phase, index=row["index"], prompt=row["prompt"], chosen=row["responses"][c],
        rejected=row["responses"][r], chosen_score=row["scores"][c], rejected_score=row["scores"][r],
        prompt_ids=row["prompt_ids"], chosen_ids=row["response_ids"][c], rejected_ids=row["response_ids"][r],
        behavior_version=version,
    )  # fmt: skip


def pair_batch(records: list[PreferenceRecord], pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences, chosen first then rejected: prompt + response + EOS.

    ``loss_mask`` marks the response tokens and EOS; behavior/reference log-probs come along as (2B,) tensors.
    """
    seqs, prompt_lens = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for r in records:
            seqs.append(r.prompt_ids + getattr(r, side) + [eos_id])
            prompt_lens.append(len(r.prompt_ids))
    batch = right_padded(seqs, prompt_lens, pad_id)

    def both(name: str) -> torch.Tensor:
        values = [getattr(r, f"{name}_chosen_logps") for r in records] + [
            getattr(r, f"{name}_rejected_logps") for r in records
        ]
        return torch.tensor(values, dtype=torch.float32)

    batch["behavior_logps"] = both("behavior")  # (2B,)
    batch["reference_logps"] = both("reference")  # (2B,)
    return batch
