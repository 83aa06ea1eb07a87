"""A persistent annotation cache: the same annotator never scores the same (prompt, response) twice.

Annotation is the expensive part of online alignment (a reward model forward, a paid judge call). Scores are kept
in SQLite, keyed by the annotator's ``identity`` (its class and settings) and the exact prompt and response text,
so re-runs, resumes and other runs that share the file reuse them. ``nan`` scores (failures) are not cached.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import time
import warnings
from pathlib import Path

from bpo_lightning.errors import BPOError, RunError


def _key(identity: str, prompt: str, response: str) -> str:
    return hashlib.sha256("\x00".join((identity, prompt, response)).encode()).hexdigest()


class AnnotationCache:
    """SQLite-backed map (annotator identity, prompt, response) → score.

    Args:
        path: the database file; created with its folder when missing.
        timeout: seconds to wait for a lock another process holds.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # several training processes write to one file: wait (``timeout`` s) for each other's short transactions
        # used from the collection's annotation thread too (one at a time)
        self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
        try:
            # write-ahead log: readers never wait for a writer, and a commit (one per paid group of scores) is cheap
            # yet survives the process being killed
            self._wait_for(lambda: self._db.execute("PRAGMA journal_mode=WAL"), timeout)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, identity TEXT, score REAL, origin TEXT)"
            )  # origin: which run paid for the score
            if "origin" not in {row[1] for row in self._db.execute("PRAGMA table_info(scores)")}:
                try:  # a file written before the column existed
                    with self._db:
                        self._db.execute("ALTER TABLE scores ADD COLUMN origin TEXT")
                except sqlite3.OperationalError as err:
                    if "duplicate column" not in str(err):  # another process added it first
                        raise
        except sqlite3.DatabaseError as err:
            raise RunError(
                f"data.annotation_cache: cannot open {self.path} ({err}); another process may hold "
                "it locked, or it is not an annotation cache"
            ) from err

    @staticmethod
    def _wait_for(statement, timeout: float) -> None:
        """Run ``statement``, retrying while another process holds the lock: switching to WAL can report "database
        is locked" at once, without SQLite's own busy wait, when several processes open a new file together."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                statement()
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, identity: str, prompts: list[str], responses: list[str]) -> list[float | None]:
        """Cached scores in input order; ``None`` where there is none."""
        return [score for score, _ in self.get_with_origin(identity, prompts, responses)]

    def get_with_origin(self, identity: str, prompts: list[str], responses: list[str]) -> list[tuple]:
        """``(score, origin)`` in input order, ``(None, None)`` where there is none; ``origin`` names the run that
        paid for the score (``None`` when not recorded)."""
        keys = [_key(identity, p, r) for p, r in zip(prompts, responses, strict=True)]
        found: dict[str, tuple] = {}
        try:
            for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, score, origin FROM scores WHERE key IN ({marks})"
                found.update((key, (score, origin)) for key, score, origin in self._db.execute(query, chunk))
        except sqlite3.OperationalError as err:
            raise RunError(
                f"data.annotation_cache: cannot read {self.path} ({err}); another process may hold "
                "it locked — wait, or set data.annotation_cache to another file"
            ) from err
        return [found.get(k, (None, None)) for k in keys]

    def put(
        self, identity: str, prompts: list[str], responses: list[str], scores: list[float], origin: str | None = None
    ) -> None:
        rows = [
            (_key(identity, p, r), identity, float(s), origin)
            for p, r, s in zip(prompts, responses, scores, strict=True)
            if s is not None and not math.isnan(s)
        ]
        with self._db:  # one transaction: committed to disk before the scores are used
            self._db.executemany(
                "INSERT OR REPLACE INTO scores (key, identity, score, origin) VALUES (?, ?, ?, ?)", rows
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cached_score(
    annotator, cache: AnnotationCache | None, prompts: list[str], responses: list[str], origin: str | None = None
):
    """Scores for all inputs, asking ``annotator`` only for those the cache lacks, and each identical
    (prompt, response) input once.

    The annotator's answers are stored in the cache group by group as they are paid for (``score_iter``), so an
    exception or a kill inside the call loses nothing already paid: a rerun finds those scores cached.

    Args:
        origin: names the run asking (its folder); scores are stored with it, and cached scores that this run paid
            for in an earlier, interrupted attempt count as paid by it, not as cache hits.

    Returns:
        (scores, positions of the inputs paid for by this run — now, or earlier with this ``origin``; the others
        came from the cache). A repeat of an input within the call counts as a cache hit. (One that recurs in a
        later call and was paid by this run counts as paid again: calls are blocks, which processes annotate
        independently, and the counts do not depend on the number of processes.)
    """
    found = cache.get_with_origin(annotator.identity, prompts, responses) if cache is not None else []
    scores = [score for score, _ in found] or [None] * len(prompts)
    first: dict[tuple, int] = {}  # (prompt, response) -> its first position in this call
    for i in range(len(prompts)):
        first.setdefault((prompts[i], responses[i]), i)
    missing = [i for i in first.values() if scores[i] is None]
    paid_before = [i for i in first.values() if scores[i] is not None and origin is not None and found[i][1] == origin]
    if not missing:
        return scores, sorted(paid_before)
    asked, answers = [prompts[i] for i in missing], [responses[i] for i in missing]
    given = [False] * len(missing)
    paid = stored = 0
    try:
        for group in annotator.score_iter(asked, answers):
            group = [(k, _checked(annotator, value, asked[k])) for k, value in group]
            stored += _store(
                cache,
                annotator,
                [asked[k] for k, _ in group],
                [answers[k] for k, _ in group],
                [value for _, value in group],
                origin,
            )
            for k, value in group:
                if given[k]:
                    raise RunError(f"data.annotator: {annotator.identity} gave two scores for one response")
                given[k], scores[missing[k]] = True, value
            paid += len(group)
    except BPOError:
        raise
    except Exception as err:
        kept = f"the {stored} scores given before are saved in {cache.path}, " if cache is not None and stored else ""
        raise RunError(
            f"data.annotator: {annotator.identity} failed after {paid} of {len(missing)} answers "
            f"({type(err).__name__}: {err}); {kept}a resume asks only for the rest "
            "(--debug shows the traceback)"
        ) from err
    if paid != len(missing):
        raise RunError(f"data.annotator: {annotator.identity} returned {paid} scores for {len(missing)} responses")
    for i, s in enumerate(scores):  # repeats of an input asked once
        if s is None:
            scores[i] = scores[first[(prompts[i], responses[i])]]
    return scores, sorted(missing + paid_before)


def _store(cache, annotator, prompts: list[str], responses: list[str], scores: list[float], origin) -> int:
    """Store scores in the cache (there is one); how many it now holds of them (NaN is not stored; a cache that
    cannot take them gets a warning)."""
    if cache is None:
        return 0
    try:
        cache.put(annotator.identity, prompts, responses, scores, origin)
    except sqlite3.OperationalError as err:  # the scores are paid for: use them, they are saved with the phase
        warnings.warn(
            f"data.annotation_cache: could not store {len(scores)} scores in {cache.path} ({err}); "
            "they are used and saved with the phase data",
            stacklevel=3,
        )
        return 0
    return sum(not math.isnan(s) for s in scores)


def _checked(annotator, value, prompt: str) -> float:
    """A score as a float: NaN for none; ±inf becomes NaN with a warning (files hold strict JSON)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise RunError(
            f"annotator {annotator.identity} returned {value!r} for the prompt {prompt[:80]!r}: a score "
            "must be a number (NaN or None where it has none)"
        )
    value = float(value)
    if math.isinf(value):
        warnings.warn(
            f"annotator {annotator.identity} returned {value} for the prompt {prompt[:80]!r}: "
            "counted as no score (NaN)",
            stacklevel=3,
        )
        return math.nan
    return value
