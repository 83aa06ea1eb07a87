"""Faults: kill points resumed to the uninterrupted run, a phase without pairs, annotators returning what is not a
score or failing half-way, a locked cache."""

import json
import math
import sqlite3
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import KILL_TABLE, CountingAnnotator, make_run

from bpo_lightning.annotation import Annotator
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.data import OnlineDataModule
from bpo_lightning.errors import RunError
from bpo_lightning.judge import LLMJudge
from bpo_lightning.prompts import PromptSource, ReviewPrompts
from bpo_lightning.store import PhaseStore


class Constant(CountingAnnotator):
    """Scores every response the same: every pair ties."""

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [0.5] * len(prompts)


class Returns(CountingAnnotator):
    scores_per_call = None  # one call for all: the first response of the call gets ``value``

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
    with pytest.raises(RunError, match=r"annotator CountingAnnotator:gold returned 'great' for the prompt 'p1'"):
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
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    assert cache.get("a", ["p"], ["r"]) == [1.0]  # write-ahead log: reading never waits for a writer
    annotator = Returns(3.0)
    with pytest.warns(UserWarning, match=r"could not store 2 scores in .*cache.sqlite.*used and saved"):
        scores, fresh = cached_score(annotator, cache, ["q1", "q2"], ["x", "yy"])
    assert scores == [3.0, 2.0] and fresh == [0, 1]  # paid for and kept
    holder.rollback()
    other = tmp_path / "notes.sqlite"
    other.write_text("not a database, " * 100)
    with pytest.raises(RunError, match=rf"data.annotation_cache: cannot open {other} .*not an annotation cache"):
        AnnotationCache(other)


def test_scores_are_cached_as_they_are_paid_for(tmp_path):
    """An annotator that fails in the middle of its call: what it answered before is in the cache, the error names
    the annotator and the count, and the rerun pays only for the rest."""
    cache = AnnotationCache(tmp_path / "cache.sqlite")

    class Flaky(CountingAnnotator):
        fail_at = 3

        def score_iter(self, prompts, responses):
            for k, (p, r) in enumerate(zip(prompts, responses, strict=True)):
                if len(self.calls) == self.fail_at:
                    raise ConnectionError("endpoint went away")
                self.calls.append(p)
                yield [(k, float(len(r)))]

    flaky = Flaky()
    prompts, responses = [f"p{i}" for i in range(6)], ["a" * i for i in range(6)]
    with pytest.raises(
        RunError,
        match=r"data.annotator: CountingAnnotator:gold failed after 3 of 6 answers "
        r"\(ConnectionError: endpoint went away\); the 3 scores given before are saved in",
    ):
        cached_score(flaky, cache, prompts, responses)
    assert cache.get(flaky.identity, prompts, responses) == [0.0, 1.0, 2.0, None, None, None]
    flaky.fail_at = None
    scores, fresh = cached_score(flaky, cache, prompts, responses)
    assert scores == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and fresh == [3, 4, 5]
    assert flaky.calls == ["p0", "p1", "p2", "p3", "p4", "p5"]  # every response paid for once


def test_checkpoints_are_written_without_per_record_crcs_and_load_equal(tmp_path):
    """The checkpoint writer skips torch.save's CRC-32s (torch.load never reads them) for this save only, and the
    file loads back equal; a failed save leaves the setting as it was and no file behind."""
    import zipfile

    from bpo_lightning.checkpoints import AtomicCheckpointIO, checked_load

    checkpoint = {"state_dict": {"w": torch.arange(6.0)}, "bpo": {"phase": 1}}
    path = tmp_path / "phase-1.ckpt"
    assert torch.serialization.get_crc32_options()
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    assert torch.serialization.get_crc32_options()  # back as it was
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if info.file_size]
        assert records and all(info.CRC == 0 for info in records)
    loaded = checked_load(path)
    assert torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"]) and loaded["bpo"] == {"phase": 1}

    with pytest.raises(TypeError, match="pickle"):
        AtomicCheckpointIO().save_checkpoint({"bad": threading.Lock()}, tmp_path / "phase-2.ckpt")
    assert torch.serialization.get_crc32_options()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase-1.ckpt"]


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


# --- kill points --------------------------------------------------------------------------------------------------
# Each run below is the fit of tests/distributed/fit.py on one process (2 phases of 16 prompts, blocks of 8, 4
# held-out prompts, metrics.csv), SIGKILLed at a named point, then resumed with ckpt_path="last" and compared with
# the uninterrupted run. The table is printed at the end of the test session.

KILL_ARGS = ("--budget", "32", "--batch-size", "4", "--eval-prompts", "4", "--log")
KILL_POINTS = {
    "sample:2": "sampling phase 1's second block",
    "annotate:5": "the 5th paid answer (phase 1, block 1)",
    "annotate:40": "the 40th paid answer (phase 2)",
    "append:1": "half-way through phase 1's first append",
    "append:3": "half-way through phase 2's first append",
    "score:2": "phase 2's behavior/reference log-probs",
    "pairs:2": "phase 2's pairs.jsonl written, not renamed",
    "step:5": "training step 5 (phase 2)",
    "evaluate:1": "phase 1's evaluation",
    "checkpoint:1": "half-way through phase 1's checkpoint",
    "checkpoint:2": "half-way through phase 2's checkpoint",
    "between:1": "between phases 1 and 2",
}


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory, sft_dir):
    """The uninterrupted run and every killed + resumed run, two subprocesses at a time (one thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_distributed import fit

    root = tmp_path_factory.mktemp("kills")

    def run(name: str, *args: str, killed: bool = False):
        out = root / name.replace(":", "-")
        tmp = out / "tmpdir"  # the fit's $TMPDIR: must stay empty
        tmp.mkdir(parents=True, exist_ok=True)
        return fit(out, sft_dir, *KILL_ARGS, *args, killed=killed, env={"TMPDIR": str(tmp)})

    def killed_then_resumed(point: str):
        killed = run(point, "--kill", point, killed=True)
        state = snapshot(killed.out)
        return point, state, run(point, "--resume")

    with ThreadPoolExecutor(max_workers=2) as pool:
        full = pool.submit(run, "uninterrupted")
        results = {point: state_resumed for point, *state_resumed in pool.map(killed_then_resumed, KILL_POINTS)}
        return full.result(), results


def snapshot(out: Path, judged: bool = False) -> dict:
    """What a killed run left: the (prompt, response) pairs it paid for (with ``judged``, the evaluator judge's
    (prompt, response A, response B) requests too), and those kept in the cache or samples."""
    log = out / "calls.rank0.json"
    paid = [tuple(c) for c in json.loads(log.read_text())] if log.exists() else []
    judge_log = out / "judge.rank0.json"
    asked = [tuple(c) for c in json.loads(judge_log.read_text())] if judged and judge_log.exists() else []
    run = out / "run"
    kept = set()
    if (run / "annotations.sqlite").exists():
        cache = AnnotationCache(run / "annotations.sqlite")
        for (name,) in cache._db.execute("SELECT DISTINCT identity FROM scores").fetchall():
            if name.endswith(":one_order"):  # the judge's orders: (prompt, response A + NUL + response B)
                found = cache.get(name, [p for p, _, _ in asked], [a + "\x00" + b for _, a, b in asked])
                kept |= {q for q, v in zip(asked, found, strict=True) if v is not None}
            else:
                found = cache.get(name, [p for p, _ in paid], [r for _, r in paid])
                kept |= {pr for pr, score in zip(paid, found, strict=True) if score is not None}
        cache.close()
    data = run / "data"
    phases = sorted(p.name for p in data.glob("phase_*.pairs.jsonl")) if data.exists() else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after some kills
        samples = sum(len(PhaseStore(data, p).load_samples()) for p in range(2)) if data.exists() else 0
    checkpoints = len(list((run / "ckpt").glob("phase-*.ckpt"))) if (run / "ckpt").exists() else 0
    return {"paid": paid + asked, "lost": [pr for pr in paid + asked if pr not in kept], "complete_phases": len(phases),
            "sample_rows": samples, "checkpoints": checkpoints}  # fmt: skip


def files_problems(out: Path) -> list[str]:
    """Files of the run folder that do not parse as strict JSON, leftover temporary files, anything in $TMPDIR,
    checkpoints that do not load."""
    from bpo_lightning.checkpoints import checked_load

    problems = []

    def strict(text):
        return json.loads(text, parse_constant=lambda c: problems.append(f"{c} in a JSON file"))

    run = out / "run"
    for path in run.rglob("*"):
        if path.name.endswith(".tmp"):
            problems.append(f"leftover {path.name}")
        elif path.suffix == ".json":
            strict(path.read_text())
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    strict(line)
                except json.JSONDecodeError:
                    problems.append(f"{path.name}:{number} does not parse")
    for ckpt in (run / "ckpt").glob("*.ckpt"):
        checked_load(ckpt)
    problems += [f"$TMPDIR holds {p.name}" for p in (out / "tmpdir").iterdir()]
    return problems


def metrics(out: Path) -> dict[tuple[str, str], str]:
    """(step, metric) → value of metrics.csv; a value logged again by a resumed run replaces the earlier one."""
    import csv

    with open(out / "run" / "metrics.csv") as f:
        return {(row["step"], k): v for row in csv.DictReader(f) for k, v in row.items() if v != "" and k != "step"}


def kill_row(label: str, full, state: dict, resumed, reannotated: int) -> tuple[bool, list[str], list[str]]:
    """A killed-then-resumed run against its uninterrupted one, as a row of the kill-point table (printed at the end
    of the session): whether the weights are equal, the files' problems, the metrics that differ."""
    weights_equal = all(torch.equal(resumed.weights[k], v) for k, v in full.weights.items())
    problems = files_problems(resumed.out)
    want, got = metrics(full.out), metrics(resumed.out)
    missing = [key for key, value in want.items() if got.get(key) != value]
    KILL_TABLE.append(
        {
            "kill point": label,
            "killed in": f"{state['complete_phases']} phases done, {state['sample_rows']} rows saved",
            "weights equal": "yes" if weights_equal else "NO",
            "re-annotations": reannotated,
            "paid-then-lost": len(state["lost"]),
            "files ok": "yes" if not problems else "; ".join(problems),
            "metrics complete": "yes" if not missing else f"{len(missing)} differ",
        }
    )
    return weights_equal, problems, missing


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_resumes_to_the_uninterrupted_run(point, kill_runs):
    full, runs = kill_runs
    state, resumed = runs[point]
    reannotated = len(resumed.calls()) - len(full.calls())
    weights_equal, problems, missing = kill_row(f"{point} ({KILL_POINTS[point]})", full, state, resumed, reannotated)
    assert weights_equal
    assert resumed.calls() == full.calls() and reannotated == 0  # the same answers, none paid twice
    assert state["lost"] == []
    assert problems == []
    assert missing == [], missing[:5]
    assert resumed.stats["phases"] == full.stats["phases"]
    # on_pairs_ready fires once per phase that is trained: in the resumed run, for the phases after the checkpoint
    ready = [event[1] for event in resumed.hooks(0) if event[0] == "on_pairs_ready"]
    assert ready == list(range(state["checkpoints"], 2)), ready


# The same with the default annotator, RuleAnnotator (blocks of 16 prompts: 32 function calls each), and with a judge
# as data.evaluator (4 held-out prompts: 8 requests per evaluation, at the start and after each phase). Each setup
# has its own uninterrupted run. A kill between the cache's INSERT and COMMIT leaves the answer of that transaction in
# the cache's pending folder, and the resume stores it before it asks anything.
KILL_SETUPS = {
    "rule": ("--annotator", "rule", "--block", "16"),
    "judge": ("--evaluator", "judge"),
}
MORE_KILL_POINTS = {  # point: (setup, what it is, answers asked again, paid-then-lost)
    "rule:20": ("rule", "the rule function's 20th call (phase 1's first block of 16 prompts)", 0, 0),
    "insert:20": ("rule", "the cache's 20th INSERT done, its COMMIT not (phase 1's first block)", 0, 0),
    "judge:12": ("judge", "the evaluator judge's 12th request (phase 1's evaluation, a pair half asked)", 0, 0),
}


@pytest.fixture(scope="module")
def more_kill_runs(tmp_path_factory, sft_dir):
    """The uninterrupted run of each setup and every killed + resumed run of MORE_KILL_POINTS, two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from test_distributed import fit

    root = tmp_path_factory.mktemp("more-kills")

    def run(name: str, setup: str, *args: str, killed: bool = False):
        out = root / name.replace(":", "-")
        tmp = out / "tmpdir"
        tmp.mkdir(parents=True, exist_ok=True)
        return fit(out, sft_dir, *KILL_ARGS, *KILL_SETUPS[setup], *args, killed=killed, env={"TMPDIR": str(tmp)})

    def killed_then_resumed(point: str):
        setup = MORE_KILL_POINTS[point][0]
        killed = run(point, setup, "--kill", point, killed=True)
        state = snapshot(killed.out, judged=setup == "judge")
        return point, state, run(point, setup, "--resume")

    with ThreadPoolExecutor(max_workers=2) as pool:
        full = {setup: pool.submit(run, f"uninterrupted-{setup}", setup) for setup in KILL_SETUPS}
        results = {point: rest for point, *rest in pool.map(killed_then_resumed, MORE_KILL_POINTS)}
        return {setup: future.result() for setup, future in full.items()}, results


def judge_calls(out: Path) -> list[tuple]:
    """Every (prompt, response A, response B) the evaluator judge was asked, sorted."""
    return sorted(tuple(c) for f in out.glob("judge.rank*.json") for c in json.loads(f.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("point", list(MORE_KILL_POINTS))
def test_a_killed_run_with_the_rule_annotator_or_a_judge_evaluator_pays_nothing_twice(point, more_kill_runs):
    """The reproductions: with the default annotator a kill at the 20th call of a block paid for the 19 before it
    again, and one between INSERT and COMMIT for the whole block (32); a judge evaluator paid again for the orders
    of an evaluation's pairs asked before a kill. Now the resume asks nothing again, and ends with the weights of the
    uninterrupted run."""
    setup, what, again, lost = MORE_KILL_POINTS[point]
    fulls, runs = more_kill_runs
    full, (state, resumed) = fulls[setup], runs[point]
    reannotated = len(resumed.calls()) - len(full.calls()) + len(judge_calls(resumed.out)) - len(judge_calls(full.out))
    weights_equal, problems, missing = kill_row(f"{point} ({what})", full, state, resumed, reannotated)
    assert state["paid"], "the kill came before anything was paid"
    assert weights_equal
    assert reannotated == again and len(state["lost"]) == lost, (reannotated, state["lost"])
    assert sorted(set(resumed.calls())) == sorted(set(full.calls()))  # the same answers
    assert sorted(set(judge_calls(resumed.out))) == sorted(set(judge_calls(full.out)))
    assert problems == []
    assert missing == [], missing[:5]
    assert resumed.stats["phases"] == full.stats["phases"]


class ScriptedJudge(LLMJudge):
    """A judge without a model: prefers the longer response, answers one prompt in five with nonsense, and is
    position-biased (always "A") on prompts mentioning a hotel, so those verdicts disagree between orders."""

    def __init__(self):
        super().__init__("scripted", template="{prompt}\n[A]{response_a}\n[B]{response_b}")

    def _complete(self, texts):
        replies = []
        for text in texts:
            self._count("requests")
            prompt, rest = text.split("\n[A]", 1)
            a, b = rest.split("\n[B]", 1)
            if sum(map(ord, prompt)) % 5 == 0:
                replies.append("I cannot decide.")
            elif "hotel" in prompt:
                replies.append("Preferred: A")
            else:
                replies.append("Preferred: A" if len(a) >= len(b) else "Preferred: B")
        return replies


@pytest.mark.slow
def test_judge_counters_reach_the_phase_stats_and_line(tmp_path, sft_dir):
    """Position bias and unparseable replies are told apart per phase (they used to be invisible)."""
    judge = ScriptedJudge()
    module, data, trainer = make_run(tmp_path, sft_dir, budget=32, num_phases=2, annotator=judge)
    trainer.fit(module, datamodule=data)
    for phase in (0, 1):
        stats = data.stats[phase]
        counts = stats.annotator
        judged = stats.prompts - stats.dropped.get("identical", 0)  # prompts with two distinct responses
        assert counts["requests"] == 2 * judged  # both orders
        assert counts["unparseable"] > 0 and counts["disagreements"] > 0
        assert stats.dropped["annotator_nan"] >= counts["disagreements"]  # a disagreement gives no verdict
        assert f"| annotator {counts['requests']} requests, 0 retries, 0 timeouts" in stats.describe()
    assert sum(data.stats[p].annotator["requests"] for p in (0, 1)) == judge.counts["requests"]
    saved = PhaseStore(tmp_path / "data", 0).load_pairs()[1]  # and they are saved with the phase
    assert saved.annotator == data.stats[0].annotator


class StoppingJudge(ScriptedJudge):
    """ScriptedJudge one reply at a time, raising at its ``fail_at``-th request (an endpoint going away); ``asked``
    holds every judge prompt it was sent."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at, self.asked = fail_at, []

    def _complete_iter(self, texts):
        for k, text in enumerate(texts):
            if len(self.asked) + 1 == self.fail_at:
                raise ConnectionError("endpoint went away")
            self.asked.append(text)
            yield k, self._complete([text])[0]


@pytest.mark.slow
def test_a_judge_phase_stopped_mid_block_counts_both_attempts_and_asks_nothing_twice(tmp_path, sft_dir):
    """The reproduction: after a stop inside a block, the phase's judge counters covered the resumed attempt only,
    and a pair with one order answered was asked again. The block's counters are now saved with its rows, and what
    the stored answers of the first attempt cost is counted by the resumed one: the same counters as a run never
    stopped, and each judge prompt sent once."""
    full = StoppingJudge()
    module, full_data, trainer = make_run(tmp_path / "full", sft_dir, budget=16, num_phases=1, annotator=full)
    trainer.fit(module, datamodule=full_data)
    broken = StoppingJudge(fail_at=20)  # inside the phase's one block of 16 prompts (up to 32 requests)
    module, data, trainer = make_run(tmp_path / "split", sft_dir, budget=16, num_phases=1, annotator=broken)
    with pytest.raises(RunError, match="endpoint went away"):
        trainer.fit(module, datamodule=data)
    resumed = StoppingJudge()
    module, data, trainer = make_run(tmp_path / "split", sft_dir, budget=16, num_phases=1, annotator=resumed)
    trainer.fit(module, datamodule=data)
    assert not set(resumed.asked) & set(broken.asked)  # no order asked twice, a half-answered pair's included
    assert sorted(broken.asked + resumed.asked) == sorted(full.asked)
    assert data.stats[0].annotator == full_data.stats[0].annotator
    assert data.stats[0].annotator["requests"] == len(full.asked) and data.stats[0].annotator["unparseable"] > 0


@pytest.mark.slow
def test_a_judge_run_stopped_by_a_dead_endpoint_resumes_against_another(tmp_path, sft_dir):
    """End to end: an HTTP judge's server dies part-way through phase 2 (its port then refuses connections); the
    run stops, and the same run resumed from its last checkpoint against a second server finishes with the weights
    of a run never stopped. Counted on the servers: every judge prompt answered once, over both."""
    from test_judge import start_stub

    from bpo_lightning.checkpoints import PhaseCheckpoint
    from bpo_lightning.judge import HTTPJudge

    def run(root, stub, ckpt_path=None):
        judge = HTTPJudge(base_url=stub.url, model="m", api_key_env=None, concurrency=1, max_retries=1, backoff=0.0)
        checkpoint = PhaseCheckpoint(
            dirpath=root / "ckpt",
            filename="phase-{phase}",
            save_last="link",
            save_top_k=-1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        module, data, trainer = make_run(
            root, sft_dir, budget=32, num_phases=2, annotator=judge, callbacks=[checkpoint]
        )
        stub.mode = "longer"
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        finally:
            stub.kill()
        return module, data

    full_stub, _ = start_stub()
    full, full_data = run(tmp_path / "full", full_stub)
    first, _ = start_stub()
    first.alive_for = full_data.stats[0].annotator["requests"] + 5  # five answers into phase 2, then gone
    with pytest.raises(RunError, match="could not reach"):
        run(tmp_path / "split", first)
    second, _ = start_stub()
    resumed, data = run(tmp_path / "split", second, ckpt_path="last")
    assert len(first.answered) == first.alive_for and second.answered
    assert not set(first.answered) & set(second.answered)  # no answer paid twice
    assert sorted(first.answered + second.answered) == sorted(full_stub.answered)
    assert data.stats[1].annotator == full_data.stats[1].annotator  # the first attempt's 5 requests counted too
    for name, value in full.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name


@pytest.mark.parametrize(("data", "kept"), [
    (b"", b""), (b"a\n", b"a\n"), (b"a\nbc", b"a\n"), (b"abc", b""), (b"x\n" + b"y" * 200_000, b"x\n"),
    (b"z" * 70_000 + b"\n" + b"q" * 70_000, b"z" * 70_000 + b"\n"),  # the newline in an earlier 64 KiB block
])  # fmt: skip
def test_a_torn_last_line_is_cut_reading_only_the_end(tmp_path, data, kept):
    from bpo_lightning.store import _cut_torn_line

    path = tmp_path / "samples.jsonl"
    path.write_bytes(data)
    with path.open("rb+") as f:
        _cut_torn_line(f)
    assert path.read_bytes() == kept


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [False, True])
def test_a_sampler_failing_mid_phase_keeps_the_blocks_before_it(tmp_path, sft_dir, pipeline):
    """A block's sampling fails (out of memory, say): the blocks sampled before it are saved, the one annotated in
    the background included, and the resumed run samples from the first missing block, asking for no answer twice."""
    from bpo_lightning.sampling import GenerateSampler

    class FailsOnce(GenerateSampler):
        calls = 0

        def sample(self, *args, **kwargs):
            FailsOnce.calls += 1
            if FailsOnce.calls == 3:
                raise RunError("data.sampler.init_args.batch_size: out of memory (stand-in)")
            return super().sample(*args, **kwargs)

    annotator = CountingAnnotator()
    module, data, trainer = make_run(tmp_path, sft_dir, budget=32, num_phases=1, annotator=annotator)
    data.sampler, data.pipeline = FailsOnce(max_new_tokens=8, batch_size=8, progress=False), pipeline
    with pytest.raises(RunError, match="out of memory"):
        trainer.fit(module, datamodule=data)
    store = PhaseStore(tmp_path / "data", 0)
    first_blocks = list(data.phase_indices(0))[:16]
    assert sorted(store.load_samples()) == sorted(first_blocks)  # blocks 1 and 2
    asked = len(annotator.calls)

    module, data, trainer = make_run(tmp_path, sft_dir, budget=32, num_phases=1, annotator=annotator)
    data.sampler, data.pipeline = FailsOnce(max_new_tokens=8, batch_size=8, progress=False), pipeline
    trainer.fit(module, datamodule=data)
    again, rest = annotator.calls[asked:], list(data.phase_indices(0))[16:]
    assert again and set(again) <= {data.pool[i]["prompt"] for i in rest}  # blocks 3 and 4 only


def test_pipelined_collection_writes_the_sequential_files(tmp_path, sft_dir):
    """Annotating block k while block k+1 is sampled: the same phase files, byte for byte, and the overlap happens.
    The overlap is observed, not timed: with the pipeline, the first annotation and the second block's sampling wait
    for each other to begin, so both are under way at once (sequentially neither could begin: each waits in vain)."""
    from bpo_lightning.sampling import GenerateSampler

    events, overlapped = [], []
    first_annotation, second_block = threading.Event(), threading.Event()

    class Slow(CountingAnnotator):
        scores_per_call = None  # a block per call

        def score(self, prompts, responses):
            first = "annotate" not in events
            events.append("annotate")
            if first and data.pipeline:  # block 1's annotation is not over before block 2 is being sampled
                first_annotation.set()
                overlapped.append(("annotation saw the sampling", second_block.wait(timeout=120)))
            return super().score(prompts, responses)

    class Timed(GenerateSampler):
        def sample(self, *args, **kwargs):
            events.append("sample")
            if events.count("sample") == 2 and data.pipeline:  # nor is block 2 sampled before that has begun
                second_block.set()
                overlapped.append(("sampling saw the annotation", first_annotation.wait(timeout=120)))
            return super().sample(*args, **kwargs)

    files = {}
    for pipeline in (False, True):
        events.clear()
        overlapped.clear()
        first_annotation.clear()
        second_block.clear()
        root = tmp_path / str(pipeline)
        module, data, trainer = make_run(root, sft_dir, budget=32, num_phases=1, annotator=Slow())
        data.sampler = Timed(max_new_tokens=16, batch_size=8, progress=False)
        data.pipeline = pipeline
        trainer.fit(module, datamodule=data)
        files[pipeline] = {p.name: p.read_bytes() for p in sorted((root / "data").iterdir()) if "sqlite" not in p.name}
        # sequential: sample, annotate, sample, annotate…; pipelined: block 2 is sampled while block 1 is annotated
        assert events.count("sample") == 4 and events.count("annotate") == 4
        if pipeline:
            assert sorted(overlapped) == [("annotation saw the sampling", True), ("sampling saw the annotation", True)]
            assert events[:3] in (["sample", "annotate", "sample"], ["sample", "sample", "annotate"])
        else:
            assert events == ["sample", "annotate"] * 4 and overlapped == []
    assert files[True] == files[False] and len(files[True]) == 3  # samples, pairs, phase file


_RULE_CALLS: list[str] = []


def _rule_failing_at_20(prompt, response):
    """A rule function that fails at its 20th call (a crash inside a 32-prompt block), else the response length."""
    if len(_RULE_CALLS) == 19 and _RULE_CALLS.count("fail") == 0:
        _RULE_CALLS.append("fail")
        raise ConnectionError("scorer went away")
    _RULE_CALLS.append(prompt)
    return float(len(response))


def test_the_default_rule_annotator_stores_each_answer_as_it_is_computed(tmp_path):
    """The reproduction: RuleAnnotator handed its scores over as one group per block, so a crash at the 20th call
    of a block lost the 19 before it. It now yields one answer at a time: those 19 are in the cache, the rerun asks
    for the other 13 only, and the failure line counts what was stored."""
    from bpo_lightning.annotation import RuleAnnotator

    _RULE_CALLS.clear()
    cache = AnnotationCache(tmp_path / "cache.sqlite")
    rule = RuleAnnotator("test_faults:_rule_failing_at_20")
    prompts, responses = [f"p{i}" for i in range(32)], ["a" * i for i in range(32)]
    with pytest.raises(RunError, match=r"failed after 19 of 32 answers .*the 19 scores given before are saved"):
        cached_score(rule, cache, prompts, responses)
    assert sum(s is not None for s in cache.get(rule.identity, prompts, responses)) == 19
    scores, fresh = cached_score(rule, cache, prompts, responses)
    assert scores == [float(i) for i in range(32)]
    assert len([c for c in _RULE_CALLS if c != "fail"]) == 32  # 19 + 13: nothing computed twice


def test_an_annotator_that_only_implements_score_stores_each_answer_as_computed(tmp_path):
    """The reproduction: an annotator with only ``score`` was asked for a block in one call, so its scores reached
    the cache when the call returned: a crash at the 20th answer of a 32-response block lost the 19 before it, which
    the rerun paid for again. ``score`` is now called per response (``scores_per_call = 1``), each call stored."""

    class ScoresOnly(Annotator):
        identity = "ScoresOnly"

        def __init__(self):
            self.calls, self.fail_at = [], 20

        def score(self, prompts, responses):
            scores = []
            for prompt, response in zip(prompts, responses, strict=True):
                if len(self.calls) + 1 == self.fail_at:
                    self.fail_at = None
                    raise ConnectionError("scorer went away")
                self.calls.append(prompt)
                scores.append(float(len(response)))
            return scores

    cache, annotator = AnnotationCache(tmp_path / "cache.sqlite"), ScoresOnly()
    prompts, responses = [f"p{i}" for i in range(32)], ["a" * i for i in range(32)]
    with pytest.raises(RunError, match=r"failed after 19 of 32 answers .*the 19 scores given before are saved"):
        cached_score(annotator, cache, prompts, responses)
    scores, _ = cached_score(annotator, cache, prompts, responses)
    assert scores == [float(i) for i in range(32)] and annotator.calls == prompts  # each answer paid for once


def test_a_failure_with_no_score_given_claims_none_saved(tmp_path):
    """The outage message used to say "the 8 paid before are saved" when every answer was NaN (nothing stored)."""

    class Dead(Annotator):
        identity = "Dead"

        def score_iter(self, prompts, responses):
            for k in range(4):
                yield [(k, math.nan)]  # a request that got no answer
            raise ConnectionError("endpoint went away")

    cache = AnnotationCache(tmp_path / "cache.sqlite")
    with pytest.raises(RunError) as info:
        cached_score(Dead(), cache, [f"p{i}" for i in range(8)], ["r"] * 8)
    assert "failed after 4 of 8 answers" in str(info.value) and "saved in" not in str(info.value)
    assert len(cache) == 0
