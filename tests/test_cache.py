"""The annotation cache: scores persist, are keyed by annotator identity, and are never paid for twice."""

import math
from pathlib import Path

from conftest import CountingAnnotator, make_run

from bpo_lightning.cache import AnnotationCache, cached_score


def test_scores_persist_per_identity(tmp_path):
    cache = AnnotationCache(tmp_path / "c" / "scores.sqlite")
    cache.put("rm-a", ["p1", "p1", "p2"], ["x", "y", "x"], [1.5, -2.0, math.nan])
    assert cache.get("rm-a", ["p1", "p2", "p1"], ["y", "x", "x"]) == [-2.0, None, 1.5]  # NaN is not cached
    assert cache.get("rm-b", ["p1"], ["x"]) == [None]  # another annotator's scores are not reused
    cache.close()
    reopened = AnnotationCache(tmp_path / "c" / "scores.sqlite")
    assert len(reopened) == 2 and reopened.get("rm-a", ["p1"], ["x"]) == [1.5]


def test_cached_score_asks_only_for_misses(tmp_path):
    cache = AnnotationCache(tmp_path / "scores.sqlite")
    annotator = CountingAnnotator()
    prompts, responses = ["hotel review : we stayed here ."] * 2, [" the staff was friendly .", " the bed was bad ."]
    first, fresh = cached_score(annotator, cache, prompts, responses)
    assert fresh == [0, 1] and len(annotator.calls) == 2
    second, fresh = cached_score(annotator, cache, prompts + prompts[:1], responses + [" the pool was great ."])
    assert second[:2] == first and fresh == [2] and len(annotator.calls) == 3


def test_identical_inputs_in_one_call_are_asked_once_and_counted_paid_once(tmp_path):
    """The same (prompt, response) twice in one call (one block) is asked once and counted paid once, the repeat as
    a cache hit; so is a repeat of a score an earlier attempt of the run paid for."""
    p, q = "hotel review : we stayed here .", "movie review : i watched it ."
    a, b, c, d = " the staff was friendly .", " the bed was bad .", " the pool was great .", " it was long ."
    cache, annotator = AnnotationCache(tmp_path / "c.sqlite"), CountingAnnotator()
    scores, paid = cached_score(annotator, cache, [p, q, p, p], [a, d, a, c], origin="run")
    assert annotator.calls == [p, q, p]  # (p, a) once
    assert scores[0] == scores[2] and paid == [0, 1, 3]
    resumed = AnnotationCache(tmp_path / "c.sqlite")  # another attempt of the run
    again = CountingAnnotator()
    scores, paid = cached_score(again, resumed, [q, q, p], [d, d, b], origin="run")
    assert again.calls == [p] and paid == [0, 2]  # (q, d) paid by the earlier attempt: counted once
    assert scores[0] == scores[1]
    _, paid = cached_score(CountingAnnotator(), resumed, [p, p], [a, a], origin="another run")
    assert paid == []  # another run's scores are cache hits


def test_a_second_run_sharing_the_cache_makes_no_annotator_call(tmp_path, sft_dir):
    shared = str(tmp_path / "shared.sqlite")
    module, data, trainer = make_run(tmp_path / "a", sft_dir, budget=16, num_phases=1)
    data.annotation_cache = shared
    trainer.fit(module, datamodule=data)
    assert data.stats[0].annotated > 0 and data.annotator.calls

    annotator = CountingAnnotator()
    module, data, trainer = make_run(tmp_path / "b", sft_dir, budget=16, num_phases=1, annotator=annotator)
    data.annotation_cache = shared
    trainer.fit(module, datamodule=data)
    assert annotator.calls == []  # same seed, same samples: every score came from the cache
    assert data.stats[0].annotated == 0 and data.stats[0].cached > 0
    assert (tmp_path / "b" / "data" / "phase_0000.pairs.jsonl").read_text() == (
        tmp_path / "a" / "data" / "phase_0000.pairs.jsonl"
    ).read_text()


def _open_and_store(args):
    from bpo_lightning.cache import AnnotationCache

    folder, i = args
    cache = AnnotationCache(Path(folder) / "shared.sqlite")
    cache.put("a", [f"p{i}"], ["r"], [float(i)], origin=str(i))
    return i


def test_processes_opening_a_new_cache_together_all_succeed(tmp_path):
    """Training processes open the run's cache at the same moment: each used to add the `origin` column to the new
    file, and all but one failed with "duplicate column name" (every multi-process fit could crash at start)."""
    import multiprocessing

    for trial in range(3):
        folder = tmp_path / str(trial)
        folder.mkdir()
        with multiprocessing.get_context("fork").Pool(4) as pool:
            assert sorted(pool.map(_open_and_store, [(folder, i) for i in range(8)])) == list(range(8))
        assert len(AnnotationCache(folder / "shared.sqlite")) == 8


KILLED_IN_THE_TRANSACTION = """
import os, sys
from bpo_lightning.cache import AnnotationCache

class DieAtCommit:  # the statements run, then the process is killed instead of committing
    def __init__(self, db):
        self.db = db
    def __getattr__(self, name):
        return getattr(self.db, name)
    def commit(self):
        os._exit(137)

cache = AnnotationCache(sys.argv[1])
cache.put("rm", ["p1"], ["x"], [1.5])
cache._db = DieAtCommit(cache._db)
cache.put("rm", ["p2", "p2"], ["x", "y"], [0.25, -3.0], origin="run")
"""


def test_a_score_killed_between_insert_and_commit_is_stored_by_the_next_opening(tmp_path):
    """A process killed after its INSERT, before its COMMIT: SQLite rolls the transaction back, but the rows were
    written down first, so the next opening of the cache stores them (the paid scores are not asked again)."""
    import shutil
    import subprocess
    import sys

    for name, keep_note in (("kept", True), ("control", False)):
        path = tmp_path / name / "scores.sqlite"
        path.parent.mkdir()
        done = subprocess.run([sys.executable, "-c", KILLED_IN_THE_TRANSACTION, str(path)], capture_output=True)
        assert done.returncode == 137, done.stderr.decode()
        notes = list((tmp_path / name / "scores.sqlite.pending").glob("*.json"))
        assert len(notes) == 1  # the first put's note was removed at its commit
        if not keep_note:
            shutil.rmtree(notes[0].parent)
        cache = AnnotationCache(path)
        if keep_note:
            assert cache.get_with_origin("rm", ["p2", "p2", "p1"], ["x", "y", "x"]) == [
                (0.25, "run"),
                (-3.0, "run"),
                (1.5, None),
            ]
            assert list(cache.pending.glob("*")) == []
        else:  # without the note the transaction is lost: the kill did come before the COMMIT
            assert cache.get("rm", ["p2", "p2", "p1"], ["x", "y", "x"]) == [None, None, 1.5]
