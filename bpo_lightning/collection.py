"""Collecting one phase's preference pairs, once, across every training process.

    behavior update → sample → annotate → persist → pairs → behavior/reference log-probs → save

``collect_phase`` is given what it uses and returns a ``PhaseResult``: the phase's prompts (``PhasePrompts``), π_β
(``BehaviorLLM``, which ``BPOModule.behavior_llm`` builds once the behavior update is done), the sampler, the
annotator, the phase's files (``PhaseStore``) and the processes (``Ranks``). It reads nothing else.

The phase's prompts are sampled in rounds, each process taking a share of a round (``shares``). A sampler with
``seeds_per_prompt`` (``GenerateSampler``'s default draw, ``VLLMSampler``) draws each prompt from the phase seed plus
its position, so a round's ``N · batch_size`` prompts are split evenly: every process gets within one prompt of the
same number. Any other sampler is handed whole *blocks* of ``sampler.batch_size`` consecutive positions, block ``b``
seeded with ``phase_seed + b · block_size``: process ``r`` of ``N`` takes blocks ``r, r + N, …``. Either way a
prompt's responses depend neither on the number of processes nor on what a killed run had already saved: 1 or N
processes, fresh or resumed, draw the same samples (up to float rounding between batch compositions). After every
round the new rows are gathered and process 0 (the only writer) appends them to ``samples.jsonl``. Pairs are then
split across processes for the behavior/reference forwards, gathered again, and process 0 writes ``pairs.jsonl``:
every process ends with the same records and the same ``PhaseStats``, so what each logs is already the total.

Observation hooks (``on_phase_start``) fire on process 0 only, once per phase.

Under ZeRO-3 every forward pass is collective: every process must call ``generate`` and the scoring forwards the
same number of times. ``BehaviorLLM.lockstep`` says so; a process without a block of its own then samples a
stand-in block whose results are discarded (and not counted).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from bpo_lightning.annotation import Annotator, PairwiseAnnotator, cached_verdicts
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.distributed import Ranks
from bpo_lightning.errors import RunError, Stopped
from bpo_lightning.plugins import get_plugins
from bpo_lightning.prompts import model_input
from bpo_lightning.sampling import Sampler, Samples, check_context
from bpo_lightning.store import PhaseStore
from bpo_lightning.types import PhaseResult, PhaseStats, PreferenceRecord, SampleRow


@dataclass
class PhasePrompts:
    """A phase's prompts: positions ``positions`` of the run's shuffled ``pool``, and the run's data seed."""

    phase: int
    pool: list[dict]
    positions: range
    seed: int

    @property
    def phase_seed(self) -> int:
        return self.seed * 1_000_003 + self.phase * 10_007


@dataclass
class BehaviorLLM:
    """π_β as one phase's collection uses it (``BPOModule.behavior_llm``)."""

    model: Any  # the policy module; inside ``computing()`` it computes as π_β
    tokenizer: Any
    version: int  # the behavior model's updates so far (provenance of the phase's data)
    computing: Callable[[], AbstractContextManager]  # π_β's weights, the training precision, a ZeRO-3 gather
    score: Callable[[list[PreferenceRecord]], None]  # fills in the behavior/reference log-probs of pairs
    provenance: dict = field(default_factory=dict)  # the module's settings that shape the phase's pairs
    lockstep: bool = False  # ZeRO-3 over several processes: every process runs every forward
    sampler_logps: bool = False  # π_β's log-probs from the sampler, where it records them
    truncated_eos: bool = True  # a response cut at max_new_tokens is scored with an EOS term


def collect_phase(
    prompts: PhasePrompts,
    behavior: BehaviorLLM,
    sampler: Sampler,
    annotator: Annotator,
    store: PhaseStore,
    ranks: Ranks,
    *,
    cache: AnnotationCache | None = None,
    pipeline: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> PhaseResult:
    """Build (or reload) one phase's preference pairs; every process returns the same result. ``stop`` says whether
    this process was asked to stop (SIGTERM); ``pipeline`` annotates a block while the next one samples."""
    phase, version = prompts.phase, behavior.version
    provenance = {"phase": phase, "behavior_version": version, "sampler": sampler.settings(),
                  "annotator": annotator.identity, "seed": prompts.seed, **behavior.provenance}  # fmt: skip
    run_dir = store.root.parent
    saved = saved_rows(store, provenance, ranks)
    if isinstance(saved, tuple):  # the phase is complete: its pairs and stats
        return PhaseResult(phase, tuple(saved[0]), saved[1], run_dir)
    if ranks.rank == 0:
        get_plugins().hook.on_phase_start(phase=phase, behavior_version=version)
    counters = getattr(annotator, "take_counts", None)
    stats = PhaseStats(phase)
    if counters is not None:  # what the annotator counted before (as the evaluator, say) is not this phase's
        stats.annotator = dict.fromkeys(counters(), 0)
    rows = Collector(prompts, behavior, sampler, annotator, store, ranks, cache, pipeline, stop).run(done=saved)
    for part in ranks.gather(sampler.take_counts()):  # an engine's seconds: the slowest process's
        for name, n in part.items():
            stats.sampler[name] = max(stats.sampler.get(name, n), n)
    records = tally(rows, prompts.positions, behavior, stats)
    if ranks.rank == 0:
        warn_truncated(stats, sampler, behavior)
    score_shared(behavior.score, records, ranks)
    if ranks.rank == 0:
        store.write_pairs(records, stats, provenance)
    ranks.barrier()  # the phase is on disk before any process moves on
    return PhaseResult(phase, tuple(records), stats, run_dir)


def saved_rows(store: PhaseStore, provenance: dict, ranks: Ranks):
    """What a run already saved of the phase, on every process: its ``(pairs, stats)`` when it is complete, else
    its rows by pool index. Data another setup saved stops every process (``PhaseStore.check``)."""
    problem = None
    if ranks.rank == 0:
        try:
            store.check(provenance)
        except RuntimeError as err:
            problem = str(err)
    problem = ranks.broadcast(problem)  # every process stops, not only the one that read the files
    if problem:
        raise RunError(problem)
    # process 0 reads the run directory for everyone (other nodes need not share its filesystem)
    saved = (store.load_pairs() if store.complete() else store.load_samples()) if ranks.rank == 0 else None
    return ranks.broadcast(saved)


def tally(
    rows: dict[int, SampleRow], positions: range, behavior: BehaviorLLM, stats: PhaseStats
) -> list[PreferenceRecord]:
    """Count every prompt of the phase into ``stats`` and return the pairs of those kept, in pool order."""
    records = []
    for index in positions:
        row = rows[index]
        stats.count(row.status, row.annotated, row.cached)
        for name, n in (row.annotator_counts or {}).items():  # a judge's requests, retries, … of every attempt
            stats.annotator[name] = stats.annotator.get(name, 0) + n
        stats.responses += len(row.responses)
        stats.truncated += sum(not f for f in row.finished)
        if row.status == "kept":
            records.append(record_from_row(row, stats.phase, behavior.version, behavior.sampler_logps,
                                           behavior.truncated_eos))  # fmt: skip
    return records


def warn_truncated(stats: PhaseStats, sampler: Sampler, behavior: BehaviorLLM) -> None:
    """Warn when more than half of the phase's responses were cut at the length limit."""
    if not stats.responses or stats.truncated / stats.responses <= 0.5:
        return
    scored = ("scored as if they ended there (model.truncated_eos: true, the paper's convention)"
              if behavior.truncated_eos else "scored without an EOS term")  # fmt: skip
    warnings.warn(f"phase {stats.phase + 1}: {stats.truncated} of {stats.responses} responses reached "
                  f"data.sampler.init_args.max_new_tokens ({sampler.max_new_tokens}) without EOS and are {scored}; "
                  "raise max_new_tokens, or set model.truncated_eos: false", stacklevel=3)  # fmt: skip


@dataclass
class Collector:
    """One phase's sampling and annotation: every prompt sampled and annotated exactly once across processes."""

    prompts: PhasePrompts
    behavior: BehaviorLLM
    sampler: Sampler
    annotator: Annotator
    store: PhaseStore
    ranks: Ranks
    cache: AnnotationCache | None = None
    pipeline: bool = True
    stop: Callable[[], bool] = lambda: False

    def run(self, done: dict[int, SampleRow]) -> dict[int, SampleRow]:
        """Rows by pool index, starting from the rows a killed run had saved (``done``).

        With ``pipeline`` a block is annotated in a worker thread while the next one is sampled (a judge's or a
        reward model's latency hides behind generation); rows are still appended in block order, and one block at
        most waits in memory."""
        positions, ranks = list(self.prompts.positions), self.ranks
        size = max(1, int(self.sampler.batch_size))
        rounds = shares(len(positions), size, ranks.world, bool(getattr(self.sampler, "seeds_per_prompt", False)))
        phase_seed = self.prompts.phase_seed
        show = self.sampler.progress and ranks.rank == 0
        bar = tqdm(total=len(positions), initial=len(done), desc=f"phase {self.prompts.phase + 1}: sampling + "
                   "annotating", unit="prompt", leave=False, disable=not show)  # fmt: skip
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate") if self.pipeline else None
        origin = str(self.store.root.parent.resolve())  # the run that pays for this phase's answers (cached_score)

        rounds_done = 0

        def finish(rows: list[SampleRow]) -> None:  # one round's rows: gathered, appended by process 0, counted
            nonlocal rounds_done
            rounds_done += 1  # every process finishes the same rounds in the same order
            ranks.arrive(f"collect/{self.prompts.phase}/{rounds_done}")  # waiting on a slow annotator: no timeout
            new = [row for part in ranks.gather(rows) for row in part]
            if ranks.rank == 0 and new:
                self.store.append_samples(new)
            done.update((row.index, row) for row in new)
            bar.update(len(new))

        pending = None  # the previous round's annotation, running while this round samples

        def flush() -> None:  # the block annotated in the background, its rows appended (once)
            nonlocal pending
            job, pending = pending, None
            if job is not None:
                finish(job.result())

        try:
            with self.behavior.computing(), quiet(self.sampler), bar:
                self.sampler.prepare(self.behavior.model, f"behavior-{self.behavior.version}")
                for share in rounds:  # one round: a share of the phase's positions per process
                    if self.stop_agreed():  # the block in flight is saved first
                        flush()
                        raise self._stopped(len(done), len(positions))
                    start, stop = share[ranks.rank]
                    job = self.sample_block(positions[start:stop], phase_seed + start, done)
                    if worker is None:
                        finish(annotate(*job, origin=origin) if job else [])
                        continue
                    flush()
                    pending = worker.submit(annotate, *job, origin=origin) if job else _done([])
                flush()
                self.sampler.release()  # an engine's memory goes back to training
                if self.stop_agreed():  # collected, not trained: stop before training starts
                    raise self._stopped(len(done), len(positions))
        except BaseException:  # a sampler out of memory, say: what was annotated in the background is saved first
            flush()
            raise
        finally:
            if worker is not None:
                worker.shutdown(wait=True, cancel_futures=True)
        return done

    def sample_block(self, block: list[int], seed: int, done: dict[int, SampleRow]) -> tuple | None:
        """Sample ``block`` (pool positions) if any of it is not saved yet; the annotation job for its unsaved
        prompts, or ``None``. Under ZeRO-3 a process without such a block samples a stand-in, discarded."""
        pool = self.prompts.pool
        if any(index not in done for index in block):
            samples = self.sample([model_input(pool[index]) for index in block], seed)
            todo = [k for k, index in enumerate(block) if index not in done]
            return self.annotator, [block[k] for k in todo], pool, _subset(samples, todo), self.cache
        if self.behavior.lockstep:  # this process's share of every collective generate
            self.sample([model_input(pool[self.prompts.positions[0]])], self.prompts.phase_seed)
        return None

    def sample(self, prompts: list, seed: int) -> Samples:
        """One block sampled as a whole (its seed and composition fix its responses)."""
        model, tokenizer = self.behavior.model, self.behavior.tokenizer
        check_context(self.sampler, model, tokenizer, prompts)
        return self.sampler.sample(model, tokenizer, prompts, seed=seed)

    def stop_agreed(self) -> bool:
        """Whether a process received SIGTERM (Lightning's signal handler sets the flag); agreed by every process."""
        stop = bool(self.stop())
        return self.ranks.most(int(stop)) > 0 if self.ranks.world > 1 else stop

    def _stopped(self, saved: int, total: int) -> Stopped:
        return Stopped(
            f"stopped by a signal during phase {self.prompts.phase + 1}'s collection, with {saved} of "
            f"{total} prompts saved; the same command with --ckpt_path last continues from them"
        )


@contextmanager
def quiet(sampler: Sampler):
    """The sampler's own per-call progress bar off while the collection shows one bar for the whole phase."""
    progress = sampler.progress
    if progress:
        sampler.progress = False
    try:
        yield
    finally:
        if progress:
            sampler.progress = progress


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def _subset(samples: Samples, keep: list[int]) -> Samples:
    names = ("prompt_ids", "response_ids", "responses", "finished", "logps", "eos_logps")
    return Samples(*(None if getattr(samples, n) is None else [getattr(samples, n)[k] for k in keep] for n in names))


def shares(n: int, size: int, world: int, per_prompt: bool) -> list[list[tuple[int, int]]]:
    """The rounds of a phase's collection over ``n`` prompt positions: per round, each process's ``(start, stop)``
    slice of them (empty: ``start == stop``), at most ``size`` (the sampler's block size) long.

    A sampler with ``seeds_per_prompt`` gets each round's ``world · size`` positions split evenly: every process
    within one prompt of the others. Otherwise process ``r`` gets the round's ``r``-th whole block, seeded as a
    whole, and processes past the last block get nothing."""
    rounds = []
    for first in range(0, n, world * size):
        if per_prompt:
            count = min(world * size, n - first)
            bounds = [first + r * count // world for r in range(world + 1)]
            rounds.append([(bounds[r], bounds[r + 1]) for r in range(world)])
        else:
            rounds.append([(min(n, first + r * size), min(n, first + (r + 1) * size)) for r in range(world)])
    return rounds


def score_shared(
    score: Callable[[list[PreferenceRecord]], None], records: list[PreferenceRecord], ranks: Ranks
) -> None:
    """Behavior/reference log-probs of ``records``: each process scores every N-th pair, then all are shared."""
    mine = records[ranks.rank :: ranks.world]
    score(mine)
    if ranks.world == 1:
        return
    scored = {r.index: r for part in ranks.gather(mine) for r in part}
    for r in records:
        s = scored[r.index]
        r.behavior_chosen_logps, r.behavior_rejected_logps = s.behavior_chosen_logps, s.behavior_rejected_logps
        r.reference_chosen_logps, r.reference_rejected_logps = s.reference_chosen_logps, s.reference_rejected_logps


def annotate(
    annotator: Annotator,
    indices: list[int],
    pool: list[dict],
    samples: Samples,
    cache: AnnotationCache | None = None,
    origin: str | None = None,
) -> list[SampleRow]:
    """Score each prompt's distinct responses in one annotator call; identical responses are not annotated, and
    responses the cache knows are not sent to the annotator (``origin``: the run, see ``cached_score``)."""
    rows, queries = [], []
    blocks = zip(indices, samples.prompt_ids, samples.responses, samples.response_ids, samples.finished, strict=False)
    for k, (index, prompt_ids, texts, ids, finished) in enumerate(blocks):  # `indices` may run past this block
        row = SampleRow(index=index, prompt=pool[index]["prompt"], prompt_ids=prompt_ids, responses=texts,
                        response_ids=ids, finished=[bool(f) for f in finished], scores=[None] * len(texts),
                        status="identical")  # fmt: skip
        if samples.logps is not None and samples.eos_logps is not None:  # π_β's own log-probs, from sampling
            row.logps, row.eos_logps = samples.logps[k], samples.eos_logps[k]
        rows.append(row)
        distinct = _distinct(texts)
        if len(distinct) >= 2:
            row.status = None  # decided once scored
            queries.extend((row, i) for i in distinct)
    if isinstance(annotator, PairwiseAnnotator):
        queries = _as_pair_queries(queries)
    counters = getattr(annotator, "take_counts", None)
    credit: dict[str, int] = {}  # what earlier attempts of this run spent on the answers it reuses
    scores, fresh = _ask(annotator, cache, queries, origin, credit) if queries else ([], [])
    if counters is not None and rows:  # what the block cost, saved with its rows: a resumed phase counts it too
        rows[0].annotator_counts = {name: n + credit.get(name, 0) for name, n in counters().items()}
    fresh = set(fresh)
    for k, ((row, i), score) in enumerate(zip(queries, scores, strict=True)):
        paid = k in fresh
        if isinstance(i, tuple):  # a verdict on the pair (first, second): +1, −1, 0 or NaN
            row.verdict = None if math.isnan(score) else float(score)
            score = math.nan if math.isnan(score) else (score > 0) - (score < 0)
            row.scores[i[0]], row.scores[i[1]] = (None, None) if math.isnan(score) else (score, -score)
            row.annotated, row.cached = row.annotated + 2 * paid, row.cached + 2 * (not paid)
            continue
        row.scores[i] = None if score is None or math.isnan(score) else float(score)  # NaN -> null in JSON
        row.annotated, row.cached = row.annotated + paid, row.cached + (not paid)
    for row in rows:
        if row.status is None:
            row.status = _choose(row)
    return rows


def _ask(annotator: Annotator, cache, queries: list, origin: str | None, credit: dict) -> tuple[list, list[int]]:
    """The scores of (row, response) queries, or the verdicts of (row, (first, second)) ones, through the cache."""
    prompts = [row.prompt for row, _ in queries]
    if isinstance(annotator, PairwiseAnnotator):
        first, second = [row.responses[a] for row, (a, _) in queries], [row.responses[b] for row, (_, b) in queries]
        return cached_verdicts(annotator, cache, prompts, first, second, origin, credit)
    return cached_score(annotator, cache, prompts, [row.responses[i] for row, i in queries], origin, credit=credit)


def _as_pair_queries(queries: list[tuple[SampleRow, int]]) -> list[tuple[SampleRow, tuple[int, int]]]:
    """(row, response) queries → one (row, (first, second)) query per row, for a pairwise annotator."""
    pairs: dict[int, list] = {}
    for row, i in queries:
        pairs.setdefault(id(row), [row]).append(i)
    return [(row, (a, b)) for row, a, b in pairs.values()]


def _distinct(texts: list[str]) -> list[int]:
    return [i for i, text in enumerate(texts) if text not in texts[:i]]


def _choose(row: SampleRow) -> str:
    """Best vs worst response by score (strict: equal scores carry no preference)."""
    scored = [(row.scores[i], i) for i in _distinct(row.responses)]
    if any(score is None for score, _ in scored):
        return "annotator_nan"  # counted: the phase line and data/dropped report it
    (best, c), (worst, r) = max(scored), min(scored)
    if best == worst:
        return "tie"
    row.chosen, row.rejected = c, r
    return "kept"


def record_from_row(
    row: SampleRow, phase: int, version: int, sampler_logps: bool = False, truncated_eos: bool = True
) -> PreferenceRecord:
    """The row's pair; with ``sampler_logps``, its behavior log-probs are the sampler's when the row has them (a
    response's sum plus its EOS term, which a response cut at the limit gets only with ``truncated_eos``, as in
    ``pair_batch``), so no forward pass has to compute them again."""
    c, r, finished = row.chosen, row.rejected, row.finished
    record = PreferenceRecord(
        phase=phase, index=row.index, prompt=row.prompt, chosen=row.responses[c], rejected=row.responses[r],
        chosen_score=row.scores[c], rejected_score=row.scores[r], prompt_ids=row.prompt_ids,
        chosen_ids=row.response_ids[c], rejected_ids=row.response_ids[r], behavior_version=version,
        chosen_finished=finished[c], rejected_finished=finished[r],
    )  # fmt: skip
    if sampler_logps and row.logps is not None and row.eos_logps is not None:
        logps, eos = row.logps, row.eos_logps
        record.behavior_chosen_logps = logps[c] + (eos[c] if finished[c] or truncated_eos else 0.0)
        record.behavior_rejected_logps = logps[r] + (eos[r] if finished[r] or truncated_eos else 0.0)
    return record


def global_batches(n: int, batch_size: int, seed: int, ranks: Ranks) -> list[tuple[list[int], int]]:
    """This process's share of every optimizer step: ``(positions, pairs in the whole step)``.

    The phase's ``n`` pairs are shuffled once with ``seed`` and cut into steps of ``batch_size`` pairs (the *global*
    batch); process ``r`` takes every N-th pair of each step. A process whose share of the last, short step is empty
    gets the step's first pair with weight 0 (every process must take part in every step).
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    steps = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    return [(step[ranks.rank :: ranks.world], len(step)) for step in steps]
