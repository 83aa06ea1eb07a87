"""The `bpo` command end to end: a tiny quickstart through LightningCLI, config shorthands, metrics on disk."""

import csv

import pytest

from bpo_lightning.cli import main

QUICKSTART = "configs/quickstart.yaml"


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bpo"])


@pytest.mark.parametrize("loss", ["IPOLoss", "SLiCLoss", "bpo_lightning.losses.DPOLoss"])
def test_registered_names_are_config_shorthands(loss, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, f"--model.loss={loss}", "--print_config"])
    out = capsys.readouterr().out
    assert f"class_path: bpo_lightning.{loss.rsplit('.', 1)[-1]}" in out or f"class_path: {loss}" in out


def test_bad_value_names_the_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--model.reference=sft", "--print_config"])
    assert "reference" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_config_runs_end_to_end(tmp_path, capsys):
    """The quickstart recipe, shrunk: 2 phases of 32 prompts, a 40-step SFT start built into a fresh cache."""
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--model.policy.init_args.cache_dir={tmp_path / 'cache'}",
            "--model.policy.init_args.steps=40",
            "--data.budget=64",
            "--data.num_phases=2",
            "--data.batch_size=8",
            "--data.sampler.init_args.max_new_tokens=16",
            "--data.sampler.init_args.progress=false",
            "--data.eval_prompts.init_args.limit=16",
        ]
    )
    out = capsys.readouterr().out
    assert "start     | eval win rate" in out
    assert "phase 1/2 | pairs" in out and "phase 2/2 | pairs" in out and "KL(policy‖behavior)" in out
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "phase-0.ckpt").exists() and (run / "checkpoints" / "phase-1.ckpt").exists()
    assert sorted(p.name for p in (run / "data").glob("*.pairs.jsonl")) == [
        "phase_0000.pairs.jsonl",
        "phase_0001.pairs.jsonl",
    ]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    names = set(rows[0])
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "data/pairs",
        "data/dropped",
        "behavior/kl",
        "behavior/version",
        "eval/win_rate",
    ):
        assert name in names, name
    versions = [float(r["behavior/version"]) for r in rows if r["behavior/version"]]
    assert versions == [0.0, 1.0]
    pairs = [float(r["data/pairs"]) for r in rows if r["data/pairs"]]
    dropped = [float(r["data/dropped"]) for r in rows if r["data/dropped"]]
    assert [p + d for p, d in zip(pairs, dropped, strict=True)] == [32.0, 32.0]
