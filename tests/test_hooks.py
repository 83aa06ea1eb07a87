"""One test per hookspec (tests/test_meta.py checks that each has a test named test_hook_<name>)."""

from pathlib import Path

import pytest

from bpo_lightning import Annotator, PreferenceLoss, Sampler, hookimpl
from bpo_lightning.cli import main
from bpo_lightning.plugins import load_plugins
from bpo_lightning.types import PhaseStats, PreferenceRecord

QUICKSTART = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")


class ConstantLoss(PreferenceLoss):
    """Test loss, arXiv 0000.00000."""

    def pair_losses(self, h):
        return h * 0 + 1


class EchoAnnotator(Annotator):
    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


class NullSampler(Sampler):
    pass


class Registrar:
    @hookimpl
    def register_losses(self, register):
        register(ConstantLoss)

    @hookimpl
    def register_annotators(self, register):
        register(EchoAnnotator)

    @hookimpl
    def register_samplers(self, register):
        register(NullSampler, name="Null")


def test_hook_register_losses():
    plugins = load_plugins(autoload=False, extra=(Registrar(),))
    assert plugins.get("losses", "ConstantLoss") is ConstantLoss
    assert plugins.infos[-1].registered["losses"] == ["ConstantLoss"]


def test_hook_register_annotators():
    plugins = load_plugins(autoload=False, extra=(Registrar(),))
    assert plugins.get("annotators", "EchoAnnotator") is EchoAnnotator


def test_hook_register_samplers(use_plugins, monkeypatch, capsys):
    plugins = use_plugins(Registrar())
    assert plugins.get("samplers", "Null") is NullSampler  # an explicit name overrides the class name
    monkeypatch.setattr("sys.argv", ["bpo"])
    with pytest.raises(SystemExit) as exit_info:  # and is the config shorthand (it used to be read as YAML's null)
        main(["fit", "--config", QUICKSTART, "--data.sampler=Null", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"  sampler:\n    class_path: {__name__}.NullSampler\n" in capsys.readouterr().out


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def on_phase_start(self, phase, behavior_version):
        self.events.append(("start", phase, behavior_version))

    @hookimpl
    def on_pairs_ready(self, phase, pairs, stats, run_dir):
        self.events.append(("pairs", phase, len(pairs), stats.kept, stats.prompts, run_dir))
        assert all(isinstance(p, PreferenceRecord) and p.phase == phase for p in pairs)
        assert isinstance(stats, PhaseStats)
        assert (run_dir / "data" / f"phase_{phase:04d}.pairs.jsonl").exists()  # saved before the hook fires


def _fit_with_recorder(tmp_path, sft_dir, use_plugins):
    from conftest import make_run

    recorder = Recorder()
    use_plugins(recorder)
    module, data, trainer = make_run(tmp_path, sft_dir, budget=24, num_phases=2)
    trainer.fit(module, datamodule=data)
    return recorder


def test_hook_on_phase_start(tmp_path, sft_dir, use_plugins):
    recorder = _fit_with_recorder(tmp_path, sft_dir, use_plugins)
    assert [e for e in recorder.events if e[0] == "start"] == [("start", 0, 0), ("start", 1, 1)]


def test_hook_on_pairs_ready(tmp_path, sft_dir, use_plugins):
    recorder = _fit_with_recorder(tmp_path, sft_dir, use_plugins)
    pairs = [e for e in recorder.events if e[0] == "pairs"]
    assert [(e[1], e[4]) for e in pairs] == [(0, 12), (1, 12)]  # 24 prompts in 2 phases
    assert all(e[2] == e[3] and e[2] > 0 for e in pairs)  # every kept pair is passed to the hook
    assert all(e[5] == tmp_path for e in pairs)
