"""A persistent annotation cache: the same annotator never scores the same (prompt, response) twice.

Annotation is the expensive part of online alignment (a reward model forward, a paid judge call). Scores are kept
in SQLite, keyed by the annotator's ``identity`` (its class and settings) and the exact prompt and response text,
so re-runs, resumes and other runs that share the file reuse them. ``nan`` scores (failures) are not cached.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import warnings
from pathlib import Path


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
        self._db = sqlite3.connect(self.path, timeout=timeout)
        try:
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, identity TEXT, score REAL)")
        except sqlite3.DatabaseError as err:
            raise RuntimeError(f"data.annotation_cache: cannot open {self.path} ({err}); another process may hold "
                               "it locked, or it is not an annotation cache") from err  # fmt: skip

    def get(self, identity: str, prompts: list[str], responses: list[str]) -> list[float | None]:
        """Cached scores in input order; ``None`` where there is none."""
        keys = [_key(identity, p, r) for p, r in zip(prompts, responses, strict=True)]
        found: dict[str, float] = {}
        try:
            for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, score FROM scores WHERE key IN ({marks})"
                found.update(self._db.execute(query, chunk).fetchall())
        except sqlite3.OperationalError as err:
            raise RuntimeError(f"data.annotation_cache: cannot read {self.path} ({err}); another process may hold "
                               "it locked — wait, or set data.annotation_cache to another file") from err  # fmt: skip
        return [found.get(k) for k in keys]

    def put(self, identity: str, prompts: list[str], responses: list[str], scores: list[float]) -> None:
        rows = [
            (_key(identity, p, r), identity, float(s))
            for p, r, s in zip(prompts, responses, scores, strict=True)
            if s is not None and not math.isnan(s)
        ]
        with self._db:  # one transaction: committed to disk before the scores are used
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cached_score(annotator, cache: AnnotationCache | None, prompts: list[str], responses: list[str]):
    """Scores for all inputs, asking ``annotator`` only for those the cache lacks.

    Returns:
        (scores, positions of the inputs the annotator scored now; the others came from the cache).
    """
    scores = cache.get(annotator.identity, prompts, responses) if cache is not None else [None] * len(prompts)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        asked = [prompts[i] for i in missing]
        fresh = annotator.score(asked, [responses[i] for i in missing])
        if len(fresh) != len(missing):
            raise RuntimeError(f"annotator {annotator.identity} returned {len(fresh)} scores for {len(missing)}")
        fresh = [_checked(annotator, value, prompt) for value, prompt in zip(fresh, asked, strict=True)]
        if cache is not None:
            try:
                cache.put(annotator.identity, asked, [responses[i] for i in missing], fresh)
            except sqlite3.OperationalError as err:  # the scores are paid for: use them, they are saved with the phase
                warnings.warn(f"data.annotation_cache: could not store {len(fresh)} scores in {cache.path} ({err}); "
                              "they are used and saved with the phase data", stacklevel=2)  # fmt: skip
        for i, s in zip(missing, fresh, strict=True):
            scores[i] = s
    return scores, missing


def _checked(annotator, value, prompt: str) -> float:
    """A score as a float: NaN for none; ±inf becomes NaN with a warning (files hold strict JSON)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"annotator {annotator.identity} returned {value!r} for the prompt {prompt[:80]!r}: a score "
                        "must be a number (NaN or None where it has none)")  # fmt: skip
    value = float(value)
    if math.isinf(value):
        warnings.warn(f"annotator {annotator.identity} returned {value} for the prompt {prompt[:80]!r}: "
                      "counted as no score (NaN)", stacklevel=3)  # fmt: skip
        return math.nan
    return value
