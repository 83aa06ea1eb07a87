"""SIGTERM (a scheduler's preemption) stops a run at a safe point with what it collected saved, exits 143 — never 0 —
and the same command with ``--ckpt_path last`` finishes the run without paying for any answer twice."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest

from bpo_lightning.cli import main
from bpo_lightning.tasks.reviews import gold_reward

QUICKSTART = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
CALLS: list[tuple[str, str]] = []
TERM_AT = {"call": 0}


def term_at_call(prompt, response):
    """The gold reward, recording each call; sends this process SIGTERM at call ``TERM_AT["call"]``."""
    CALLS.append((prompt, response))
    if len(CALLS) == TERM_AT["call"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return gold_reward(prompt, response)


class TermAtStep(L.Callback):
    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bpo"])
    CALLS.clear()
    TERM_AT["call"] = 0
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def command(run: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        f"--trainer.default_root_dir={run}",
        f"--model.policy.init_args.cache_dir={cache}",
        "--model.policy.init_args.steps=40",
        "--data.budget=48",
        "--data.num_phases=2",
        "--data.batch_size=4",
        "--data.sampler.init_args.max_new_tokens=8",
        "--data.sampler.init_args.batch_size=8",
        "--data.sampler.init_args.progress=false",
        "--data.eval_prompts=null",
        "--data.annotator.init_args.function=test_preemption:term_at_call",
        *extra,
    ]


def stopped(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 143  # not 0: a scheduler must see that the job did not finish
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bpo: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*there is no last checkpoint available")  # phase 1 had not finished
def test_sigterm_during_collection_saves_the_block_in_flight_and_resumes(tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    # phase 1: 24 prompts in 3 blocks of 8; block 1 is annotated (up to 16 answers) in a worker thread while block 2
    # is sampled. The signal comes at the 10th answer; the next safe point is the next block boundary, and the blocks
    # in flight are saved first: 8 or 16 prompts, depending on how far sampling got when the signal arrived
    TERM_AT["call"] = 10
    line = stopped(command(run, cache), capsys)
    saved = (run / "data" / "phase_0000.samples.jsonl").read_text().splitlines()
    assert len(saved) in (8, 16), len(saved)
    assert f"stopped by a signal during phase 1's collection, with {len(saved)} of 24 prompts saved" in line, line
    paid_before = list(CALLS)
    TERM_AT["call"] = 0
    main(command(run, cache, "--ckpt_path=last"))
    assert len(set(CALLS)) == len(CALLS)  # nothing paid twice, across both attempts
    assert set(paid_before) <= set(CALLS[: len(paid_before)])
    stats = [json.loads((run / "data" / f"phase_{p:04d}.json").read_text())["stats"] for p in (0, 1)]
    assert [s["prompts"] for s in stats] == [24, 24]
    assert (run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_sigterm_during_training_exits_143_and_resumes(tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = command(run, cache, "--trainer.callbacks+=test_preemption.TermAtStep", "--trainer.callbacks.step=8")
    line = stopped(argv, capsys)
    assert "stopped by SIGTERM during training" in line and "--ckpt_path last" in line, line
    assert (run / "checkpoints" / "last.ckpt").exists()  # phase 1 (about 6 steps) finished before the signal
    paid = len(CALLS)
    main(command(run, cache, "--ckpt_path=last"))
    assert len(CALLS) == paid  # phase 2's pairs were complete: the resume paid for nothing
    assert json.loads((run / "data" / "phase_0001.json").read_text())["complete"]
