"""A persistent annotation cache: the same annotator never scores the same (prompt, response) twice.

Annotation is the expensive part of online alignment (a reward model forward, a paid judge call). Scores are kept
in SQLite, keyed by the annotator's ``identity`` (its class and settings) and the exact prompt and response text,
so re-runs, resumes and other runs that share the file reuse them. ``nan`` scores (failures) are not cached.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from pathlib import Path


def _key(identity: str, prompt: str, response: str) -> str:
    return hashlib.sha256("\x00".join((identity, prompt, response)).encode()).hexdigest()


class AnnotationCache:
    """SQLite-backed map (annotator identity, prompt, response) → score.

    Args:
        path: the database file; created with its folder when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # several training processes write to one file: wait for each other's short transactions
        self._db = sqlite3.connect(self.path, timeout=60.0)
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, identity TEXT, score REAL)")

    def get(self, identity: str, prompts: list[str], responses: list[str]) -> list[float | None]:
        """Cached scores in input order; ``None`` where there is none."""
        keys = [_key(identity, p, r) for p, r in zip(prompts, responses, strict=True)]
        found: dict[str, float] = {}
        for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk).fetchall())
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
        fresh = annotator.score([prompts[i] for i in missing], [responses[i] for i in missing])
        if len(fresh) != len(missing):
            raise RuntimeError(f"annotator {annotator.identity} returned {len(fresh)} scores for {len(missing)}")
        if cache is not None:
            cache.put(annotator.identity, [prompts[i] for i in missing], [responses[i] for i in missing], fresh)
        for i, s in zip(missing, fresh, strict=True):
            scores[i] = s
    return scores, missing
