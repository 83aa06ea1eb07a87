"""A persistent annotation cache: the same annotator never scores the same (prompt, response) twice.

Annotation is the expensive part of online alignment (a reward model forward, a paid judge call). Scores are kept
in SQLite, keyed by the annotator's ``identity`` (its class and settings) and the exact prompt and response text,
so re-runs, resumes and other runs that share the file reuse them. A :class:`NoScore` (no score, and why: a judge's
unparseable reply, two orders that disagree, a failed request) is stored with its kind and reused like a score; a
plain ``nan`` is not stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import Collection
from pathlib import Path

from bpo_lightning.errors import BPOError, RunError


class NoScore(float):
    """No score, and why: a NaN carrying its ``kind`` (``"unparseable"``, ``"disagreement"``, ``"failed"``, …).

    It is stored in the annotation cache with its kind, so that the question is not paid for again; an annotator's
    ``ask_again`` names the kinds it asks again instead. ``paid`` says whether an answer was paid for: a reply that
    could not be read was, a request that failed was not. An unpaid one is stored once the call that asked it ends
    without an error, so that a run stopped by a dead endpoint asks it again on resume."""

    __slots__ = ("kind", "paid")

    def __new__(cls, kind: str, paid: bool = True) -> NoScore:
        value = super().__new__(cls, math.nan)
        value.kind, value.paid = kind, paid
        return value

    def __reduce__(self):
        return NoScore, (self.kind, self.paid)

    def __repr__(self) -> str:
        return f"NoScore({self.kind!r})"


_COLUMNS = "(key, identity, score, origin, kind, spent)"


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
            # origin: which run paid for the score; kind: why there is none (a NoScore); spent: the annotator's
            # counters spent on it (a judge's requests, retries, …), which a resumed attempt of the run adds to its own
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, identity TEXT, score REAL, "
                "origin TEXT, kind TEXT, spent TEXT)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(scores)")}
            for column in ("origin", "kind", "spent"):
                if column in columns:
                    continue
                try:  # a file written before the column existed
                    with self._db:
                        self._db.execute(f"ALTER TABLE scores ADD COLUMN {column} TEXT")
                except sqlite3.OperationalError as err:
                    if "duplicate column" not in str(err):  # another process added it first
                        raise
            self._recover()
        except sqlite3.DatabaseError as err:
            raise RunError(
                f"data.annotation_cache: cannot open {self.path} ({err}); another process may hold "
                "it locked, or it is not an annotation cache"
            ) from err

    @property
    def pending(self) -> Path:
        """The folder of scores written down before their transaction: one file per :meth:`put`, removed once it
        commits. A process killed inside the transaction leaves its file, and the next opening of the cache stores
        it, so a score paid for is not lost between SQLite's INSERT and COMMIT."""
        return self.path.with_name(self.path.name + ".pending")

    def _recover(self) -> None:
        """Store the scores of transactions that a killed process left open (rows a live process is writing may be
        stored here too: the same rows, so that is harmless)."""
        files = sorted(self.pending.glob("*.json")) if self.pending.is_dir() else []
        rows = []
        for file in files:
            try:
                rows += [tuple(row) for row in json.loads(file.read_text())]
            except (OSError, ValueError):  # torn by a kill while being written: its transaction never began
                pass
        if rows:
            with self._db:
                self._db.executemany(f"INSERT OR IGNORE INTO scores {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)", rows)
        for file in files:
            file.unlink(missing_ok=True)
        for torn in self.pending.glob("*.tmp") if self.pending.is_dir() else ():  # a kill while one was written
            try:
                old = time.time() - torn.stat().st_mtime > 3600  # (not one another process is writing now)
            except FileNotFoundError:  # another process has just renamed it into place
                continue
            if old:
                torn.unlink(missing_ok=True)

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
        """Cached scores in input order (a :class:`NoScore` where a no-score was stored); ``None`` where there is
        none."""
        return [score for score, _ in self.get_with_origin(identity, prompts, responses)]

    def get_with_origin(self, identity: str, prompts: list[str], responses: list[str]) -> list[tuple]:
        """``(score, origin)`` in input order, ``(None, None)`` where there is none; ``origin`` names the run that
        paid for the score (``None`` when not recorded)."""
        return [(score, origin) for score, origin, _ in self.get_rows(identity, prompts, responses)]

    def get_rows(self, identity: str, prompts: list[str], responses: list[str]) -> list[tuple]:
        """``(score, origin, spent)`` in input order, ``(None, None, None)`` where there is none; ``spent`` is the
        annotator's counters recorded with the score (``None`` when none were)."""
        keys = [_key(identity, p, r) for p, r in zip(prompts, responses, strict=True)]
        found: dict[str, tuple] = {}
        try:
            for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, score, origin, kind, spent FROM scores WHERE key IN ({marks})"
                for key, score, origin, kind, spent in self._db.execute(query, chunk):
                    found[key] = (NoScore(kind) if kind else score, origin, json.loads(spent) if spent else None)
        except sqlite3.OperationalError as err:
            raise RunError(
                f"data.annotation_cache: cannot read {self.path} ({err}); another process may hold "
                "it locked — wait, or set data.annotation_cache to another file"
            ) from err
        return [found.get(k, (None, None, None)) for k in keys]

    def put(
        self,
        identity: str,
        prompts: list[str],
        responses: list[str],
        scores: list[float],
        origin: str | None = None,
        spent: dict[str, int] | None = None,
    ) -> None:
        """Store scores (a :class:`NoScore` with its kind; a plain ``nan`` is left out) in one transaction; ``spent``
        (the annotator's counters spent on them) is recorded with the first."""
        rows = []
        for p, r, s in zip(prompts, responses, scores, strict=True):
            kind = s.kind if isinstance(s, NoScore) else None
            if kind is None and (s is None or math.isnan(s)):
                continue
            value = None if kind else float(s)
            rows.append((_key(identity, p, r), identity, value, origin, kind, json.dumps(spent) if spent else None))
            spent = None
        if not rows:
            return
        # written down first: a kill between the INSERT and the COMMIT leaves the file for the next opening
        self.pending.mkdir(exist_ok=True)
        note = self.pending / f"{uuid.uuid4().hex}.json"
        tmp = note.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, note)
        try:
            self._db.executemany(f"INSERT OR REPLACE INTO scores {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.commit()  # committed to disk before the scores are used
        except BaseException:
            self._db.rollback()
            raise
        note.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cached_score(
    annotator,
    cache: AnnotationCache | None,
    prompts: list[str],
    responses: list[str],
    origin: str | None = None,
    *,
    renew: Collection[int] = (),
    credit: dict[str, int] | None = None,
):
    """Scores for all inputs, asking ``annotator`` only for those the cache lacks, and each identical
    (prompt, response) input once.

    The annotator's answers are stored in the cache group by group as they are paid for (``score_iter``), so an
    exception or a kill inside the call loses nothing already paid: a rerun finds those scores cached. A cached
    :class:`NoScore` is reused like a score unless its kind is one of the annotator's ``ask_again``.

    Args:
        origin: names the run asking (its folder); scores are stored with it, and cached scores that this run paid
            for in an earlier, interrupted attempt count as paid by it, not as cache hits.
        renew: positions asked again although they are cached.
        credit: where the annotator keeps counters (``totals()``: a judge's requests, retries, …), what each group
            cost is stored with it, and the counters that earlier attempts of this run (``origin``) spent on the
            answers it reuses are added to ``credit``: a resumed phase counts them once.

    Returns:
        (scores, positions of the inputs paid for by this run — now, or earlier with this ``origin``; the others
        came from the cache). A repeat of an input within the call counts as a cache hit. (One that recurs in a
        later call and was paid by this run counts as paid again: calls are blocks, which processes annotate
        independently, and the counts do not depend on the number of processes.)
    """
    found = cache.get_rows(annotator.identity, prompts, responses) if cache is not None else []
    again = set(getattr(annotator, "ask_again", None) or ())
    scores = [None if isinstance(s, NoScore) and s.kind in again else s for s, _, _ in found] or [None] * len(prompts)
    first: dict[tuple, int] = {}  # (prompt, response) -> its first position in this call
    for i in range(len(prompts)):
        first.setdefault((prompts[i], responses[i]), i)
    renew = set(renew)
    missing = [i for i in first.values() if scores[i] is None or i in renew]
    paid_before = [i for i in first.values() if i not in missing and origin is not None and found[i][1] == origin]
    for i in paid_before if credit is not None else ():
        _add(credit, found[i][2] or {})
    if not missing:
        return scores, sorted(paid_before)
    answers = _ask(annotator, cache, [prompts[i] for i in missing], [responses[i] for i in missing], origin)
    for i, value in zip(missing, answers, strict=True):
        scores[i] = value
    for i, s in enumerate(scores):  # repeats of an input asked once
        if s is None:
            scores[i] = scores[first[(prompts[i], responses[i])]]
    return scores, sorted(missing + paid_before)


def _ask(annotator, cache: AnnotationCache | None, asked: list[str], answers: list[str], origin) -> list[float]:
    """The annotator's scores for every input, each group stored in the cache as it is paid for."""
    scores: list = [None] * len(asked)
    paid = stored = 0
    spending = Spending(getattr(annotator, "totals", None))
    unpaid: list[tuple[int, float]] = []  # failed requests: stored once the call ends without an error

    def save(items: list[tuple[int, float]]) -> int:  # (position, score) pairs into the cache
        prompts, responses = [asked[k] for k, _ in items], [answers[k] for k, _ in items]
        return _store(cache, annotator, prompts, responses, [value for _, value in items], origin, spending)

    try:
        for group in annotator.score_iter(asked, answers):
            group = [(k, _checked(annotator, value, asked[k])) for k, value in group]
            for k, value in group:
                if scores[k] is not None:
                    raise RunError(f"data.annotator: {annotator.identity} gave two scores for one response")
                scores[k] = value
            paid += len(group)
            unpaid += [(k, v) for k, v in group if isinstance(v, NoScore) and not v.paid]
            group = [(k, v) for k, v in group if not (isinstance(v, NoScore) and not v.paid)]
            if group:
                stored += save(group)
    except BPOError:
        raise
    except Exception as err:
        kept = f"the {stored} scores given before are saved in {cache.path}, " if cache is not None and stored else ""
        raise RunError(
            f"data.annotator: {annotator.identity} failed after {paid} of {len(asked)} answers "
            f"({type(err).__name__}: {err}); {kept}a resume asks only for the rest "
            "(--debug shows the traceback)"
        ) from err
    if paid != len(asked):
        raise RunError(f"data.annotator: {annotator.identity} returned {paid} scores for {len(asked)} responses")
    if unpaid:
        save(unpaid)
    return scores


class Spending:
    """What an annotator's counters (``totals``: a callable returning them, or ``None``) grew by since the previous
    group was stored: recorded with the group, so that a resumed attempt of the run can count it."""

    def __init__(self, totals) -> None:
        self.totals = totals
        self.last = totals() if totals is not None else {}

    def take(self) -> dict[str, int] | None:
        if self.totals is None:
            return None
        now = self.totals()
        spent = {name: n - self.last.get(name, 0) for name, n in now.items() if n != self.last.get(name, 0)}
        self.last = now
        return spent or None


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for name, n in counts.items():
        total[name] = total.get(name, 0) + n


def _store(cache, annotator, prompts: list[str], responses: list[str], scores: list[float], origin, spending) -> int:
    """Store scores in the cache (there is one), with what they cost; how many scores (not no-scores) it now holds
    of them (a plain NaN is not stored; a cache that cannot take them gets a warning)."""
    if cache is None:
        return 0
    try:
        cache.put(annotator.identity, prompts, responses, scores, origin, spending.take())
    except sqlite3.OperationalError as err:  # the scores are paid for: use them, they are saved with the phase
        warnings.warn(
            f"data.annotation_cache: could not store {len(scores)} scores in {cache.path} ({err}); "
            "they are used and saved with the phase data",
            stacklevel=3,
        )
        return 0
    return sum(not math.isnan(s) for s in scores)


def _checked(annotator, value, prompt: str) -> float:
    """A score as a float: NaN for none (a NoScore as it is); ±inf becomes NaN with a warning (files hold strict
    JSON)."""
    if value is None:
        return math.nan
    if isinstance(value, NoScore):
        return value
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
