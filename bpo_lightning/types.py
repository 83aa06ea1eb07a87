"""Records that flow from a phase's collection into training, and what is saved of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class PreferenceRecord:
    """One preference pair, as saved in the run directory and trained on.

    Token ids are exactly what the behavior model saw and sampled: ``prompt_ids`` include BOS, response ids stop
    before EOS (EOS is appended when scoring). Log-probabilities are sums over the response tokens plus EOS.
    """

    phase: int
    index: int  # position of the prompt in the run's shuffled prompt pool
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    behavior_version: int
    behavior_chosen_logps: float = float("nan")
    behavior_rejected_logps: float = float("nan")
    reference_chosen_logps: float = float("nan")  # = behavior_* when the reference is the behavior LLM
    reference_rejected_logps: float = float("nan")
    chosen_finished: bool = True  # the response ended with EOS (False: cut at max_new_tokens)
    rejected_finished: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> PreferenceRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class SampleRow:
    """One prompt of a phase as sampled and annotated: a line of ``data/phase_NNNN.samples.jsonl``.

    ``status`` is what happened to it: ``kept`` (a pair: responses ``chosen`` and ``rejected``), or dropped as
    ``identical``, ``tie`` or ``annotator_nan``; ``None`` until it is scored.
    """

    index: int  # position of the prompt in the run's shuffled prompt pool
    prompt: str | list  # the prompt's text (or chat messages)
    prompt_ids: list[int]  # as the sampler encoded it (with BOS)
    responses: list[str]
    response_ids: list[list[int]]  # without EOS
    finished: list[bool]  # which responses ended with EOS (rows saved before this was recorded: all of them)
    scores: list[float | None]  # the annotator's, None where it gave none (+1 / −1 for a pairwise verdict)
    status: str | None = None
    chosen: int | None = None
    rejected: int | None = None
    annotated: int = 0  # responses the annotator was paid for (a pairwise verdict counts 2)
    cached: int = 0  # responses whose score came from the annotation cache
    verdict: float | None = None  # a pairwise annotator's verdict on (first, second): +1, −1, 0; None: none
    logps: list[float] | None = None  # π_β's log-probs recorded by the sampler (sums over response_ids)
    eos_logps: list[float] | None = None  # and of EOS right after each response
    annotator_counts: dict[str, int] | None = None  # on a block's first row: the annotator's counters it cost

    def to_json(self) -> dict:
        """The line's fields, the optional ones (pair, counts, verdict, log-probs, counters) left out while unset."""
        return {k: v for k, v in asdict(self).items() if v is not None and not (k in ("annotated", "cached") and not v)}

    @classmethod
    def from_json(cls, row: dict) -> SampleRow:
        """A saved line; a line saved before ``finished`` was recorded has every response ending with EOS."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["finished"] = values.get("finished") or [True] * len(values.get("responses", []))
        return cls(**values)


@dataclass
class PhaseStats:
    """What happened to a phase's prompts: kept as pairs, or dropped (and why)."""

    phase: int
    prompts: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count: identical, tie, annotator_nan
    annotated: int = 0  # responses the annotator scored (the budget spent)
    cached: int = 0  # responses whose score came from the annotation cache
    annotator: dict[str, int] = field(default_factory=dict)  # the annotator's own counters (a judge's requests, …)
    sampler: dict[str, float] = field(default_factory=dict)  # the sampler's own (an engine's sync seconds, …)
    responses: int = 0  # responses sampled
    truncated: int = 0  # of them, cut at max_new_tokens (no EOS)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def count(self, status: str, annotated: int = 0, cached: int = 0) -> None:
        self.prompts += 1
        self.annotated += annotated
        self.cached += cached
        if status == "kept":
            self.kept += 1
        else:
            self.dropped[status] = self.dropped.get(status, 0) + 1

    def describe(self) -> str:
        reasons = ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items()))
        text = f"{self.kept} kept, {self.dropped_total} dropped" + (f" ({reasons})" if reasons else "")
        if self.truncated:
            text += f" | {self.truncated / max(self.responses, 1):.1%} truncated"
        text += f" | annotations {self.annotated} paid, {self.cached} cached"
        if self.annotator:
            text += " | annotator " + ", ".join(f"{n} {name}" for name, n in self.annotator.items())
        if self.sampler:
            text += " | sampler " + ", ".join(f"{name} {_short(n)}" for name, n in self.sampler.items())
        return text


def _short(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class PhaseResult:
    """What one phase's collection returns (``collection.collect_phase``): the same on every process."""

    phase: int
    records: tuple[PreferenceRecord, ...]  # the pairs the policy trains on, in pool order
    stats: PhaseStats
    run_dir: Path  # where the phase's files are (``data/phase_NNNN.*``)


class PhaseSteps(Sequence):
    """A phase's training loader's items, one per batch (``(positions, pairs in the batch)``), the ``PhaseResult``
    they come from, and the batches of the later phases if each of their prompts gives a pair (``later``; their
    drops are not known yet): the module reads them from the loader when the phase's training starts."""

    def __init__(self, steps: list[tuple[list[int], int]], result: PhaseResult, later: tuple[int, ...] = ()) -> None:
        self.steps, self.result, self.later = steps, result, later

    def __getitem__(self, k):
        return self.steps[k]

    def __len__(self) -> int:
        return len(self.steps)
