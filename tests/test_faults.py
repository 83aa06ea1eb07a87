"""Faults and bad input: a phase without pairs, annotators returning what is not a score, a locked cache."""

import json
import math
import sqlite3

import pytest
from conftest import CountingAnnotator, make_run

from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.data import OnlineDataModule
from bpo_lightning.prompts import PromptSource, ReviewPrompts
from bpo_lightning.store import PhaseStore


class Constant(CountingAnnotator):
    """Scores every response the same: every pair ties."""

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [0.5] * len(prompts)


class Returns(CountingAnnotator):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [self.value] + [float(len(r)) for r in responses[1:]]


@pytest.mark.slow
def test_a_phase_without_pairs_stops_the_run_and_says_why(tmp_path, sft_dir):
    """It used to end with exit 0, "No training batches", having trained nothing."""
    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1, annotator=Constant())
    with pytest.raises(RuntimeError) as err:
        trainer.fit(module, datamodule=data)
    message = str(err.value)
    assert message.startswith("phase 1 kept 0 pairs of 16 prompts, fewer than data.min_pairs (1); dropped: ")
    assert "tie" in message and "Likely cause: every pair tied" in message
    assert len(PhaseStore(tmp_path / "data", 0).load_samples()) == 16  # the paid annotations are on disk
    with pytest.raises(ValueError, match="data.min_pairs must be >= 1, got 0"):
        OnlineDataModule(prompts=ReviewPrompts("prompts"), annotator=Constant(), min_pairs=0)


def test_an_annotator_returning_a_non_number_is_named_with_the_prompt():
    with pytest.raises(TypeError, match=r"annotator CountingAnnotator:gold returned 'great' for the prompt 'p1'"):
        cached_score(Returns("great"), None, ["p1", "p2"], ["a", "bb"])


def test_infinite_scores_become_no_score_with_a_warning(tmp_path):
    cache = AnnotationCache(tmp_path / "cache.sqlite")
    with pytest.warns(UserWarning, match=r"returned inf for the prompt 'p1': counted as no score"):
        scores, fresh = cached_score(Returns(math.inf), cache, ["p1", "p2"], ["a", "bb"])
    assert math.isnan(scores[0]) and scores[1] == 2.0 and fresh == [0, 1]
    json.dumps(scores, allow_nan=True)  # NaN is written as null by the store, never Infinity
    assert cache.get("CountingAnnotator:gold", ["p1", "p2"], ["a", "bb"]) == [None, 2.0]  # NaN is not cached


def test_a_locked_cache_names_its_file_and_loses_no_paid_score(tmp_path):
    path = tmp_path / "cache.sqlite"
    AnnotationCache(path).put("a", ["p"], ["r"], [1.0])
    cache = AnnotationCache(path, timeout=0.1)
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the file
    with pytest.raises(RuntimeError, match=rf"data.annotation_cache: cannot open {path} \(database is locked\)"):
        AnnotationCache(path, timeout=0.1)
    with pytest.raises(RuntimeError, match=rf"data.annotation_cache: cannot read {path} \(database is locked\)"):
        cached_score(Returns(3.0), cache, ["p"], ["r"])
    holder.rollback()
    holder.execute("BEGIN IMMEDIATE")  # now readable, not writable
    annotator = Returns(3.0)
    with pytest.warns(UserWarning, match=r"could not store 2 scores in .*cache.sqlite.*used and saved"):
        scores, fresh = cached_score(annotator, cache, ["q1", "q2"], ["x", "yy"])
    assert scores == [3.0, 2.0] and fresh == [0, 1]  # paid for and kept
    holder.rollback()


def test_metrics_csv_keeps_the_rows_of_an_earlier_attempt(tmp_path):
    """Lightning's CSVLogger deleted metrics.csv when its folder was not empty: every resume lost earlier rows."""
    import csv

    from bpo_lightning.logs import RunCSVLogger

    (tmp_path / "run.json").write_text("{}")  # the folder is not empty, as on any resume
    first = RunCSVLogger(save_dir=str(tmp_path), name="", version="")
    first.log_metrics({"loss": 1.0}, step=0)
    first.save()
    second = RunCSVLogger(save_dir=str(tmp_path), name="", version="")  # the resumed attempt
    second.log_metrics({"loss": 0.5, "eval/win_rate": 0.7}, step=1)  # and a metric the first never logged
    second.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["eval/win_rate"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", "0.7")]


def test_a_prompt_longer_than_the_context_is_refused_naming_the_keys(tmp_path, sft_dir):
    """The tiny policy has 128 positions: 120 prompt tokens + 16 new tokens + EOS do not fit (it used to fail with
    "IndexError: index out of range in self" inside the model)."""
    from bpo_lightning.sampling import GenerateSampler

    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "hotel review : " + "we stayed here . " * 40}) + "\n" +
                            json.dumps({"prompt": "phone review : i bought it ."}) + "\n")  # fmt: skip
    module, data, trainer = make_run(tmp_path, sft_dir, budget=2, num_phases=1)
    data.prompts = PromptSource(str(long_prompts))
    data.sampler = GenerateSampler(max_new_tokens=16, max_prompt_tokens=120, progress=False)
    with pytest.raises(ValueError) as err:
        trainer.fit(module, datamodule=data)
    message = str(err.value)
    assert "data.prompts: the prompt 'hotel review : we stayed here" in message and "has 120 tokens" in message
    assert "exceeds the policy's context of 128 positions" in message
    assert "data.sampler.init_args.max_prompt_tokens to at most 111" in message
    assert data.annotator.calls == []  # refused before anything was sampled or paid
