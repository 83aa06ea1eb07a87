"""Run reports and figures: report.json and plots/phases.png per run, `bpo compare` across runs."""

import json

import pytest
from conftest import make_run

from bpo_lightning.cli import main
from bpo_lightning.plots import plot_histories
from bpo_lightning.reporting import PhaseReport


def test_plot_histories_writes_a_png(tmp_path):
    histories = {
        "bpo": [{"phase": 0, "win_rate": 0.4, "reward": 0.1}, {"phase": 1, "win_rate": 0.6, "kl": 0.2}],
        "dpo": [{"phase": 0, "win_rate": 0.4}, {"phase": 1, "win_rate": 0.5, "length": 12.0}],
    }
    out = plot_histories(histories, tmp_path / "f" / "x.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.slow
def test_run_writes_report_and_figure_and_compare_reads_them(tmp_path, sft_dir, capsys, monkeypatch):
    from bpo_lightning import RuleAnnotator

    report = PhaseReport()
    proxy = RuleAnnotator("bpo_lightning.tasks.reviews:proxy_reward")
    module, data, trainer = make_run(
        tmp_path / "a", sft_dir, budget=16, num_phases=2, callbacks=[report], annotator=proxy, eval_prompts=16
    )
    data.evaluator = RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward")
    trainer.fit(module, datamodule=data)
    history = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [h["phase"] for h in history] == [0, 1, 2]
    assert all("win_rate" in h and "proxy_reward" in h and "length" in h and "kl_initial" in h for h in history)
    assert all("kl" in h and "pairs" in h for h in history[1:])
    assert (tmp_path / "a" / "plots" / "phases.png").stat().st_size > 5000
    monkeypatch.setattr("sys.argv", ["bpo"])
    main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "c.png")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "c.png").exists()
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png")])
    assert "report.json not found" in capsys.readouterr().err


def test_compare_says_which_runs_have_no_phase_yet_and_keeps_runs_of_one_name_apart(tmp_path, capsys, monkeypatch):
    from bpo_lightning.plots import plot_histories

    finished = [
        {"phase": 0, "win_rate": 0.4, "kl_initial": 0.0, "kl_initial_stderr": 0.0},
        {"phase": 1, "win_rate": 0.6, "kl_initial": 1.0, "kl_initial_stderr": 0.2},
    ]
    for folder, history in [("x/run", finished), ("y/run", finished), ("new", finished[:1])]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "report.json").write_text(json.dumps(history))
    monkeypatch.setattr("sys.argv", ["bpo"])
    main(["compare", str(tmp_path / "x/run"), str(tmp_path / "y/run"), str(tmp_path / "new"), "--out",
          str(tmp_path / "c.png")])  # fmt: skip
    captured = capsys.readouterr()
    assert "new has not finished a phase yet: only its start is drawn" in captured.err
    assert "run has not finished" not in captured.err and (tmp_path / "c.png").stat().st_size > 5000
    captured_histories = {}
    monkeypatch.setattr(
        "bpo_lightning.plots.plot_histories",
        lambda histories, out: captured_histories.update(histories) or plot_histories(histories, out),
    )
    main(["compare", str(tmp_path / "x/run"), str(tmp_path / "y/run"), "--out", str(tmp_path / "d.png")])
    assert sorted(captured_histories) == [str(tmp_path / "x/run"), str(tmp_path / "y/run")]  # both kept, by path
