"""The `bpo` command end to end: a tiny quickstart through LightningCLI, config shorthands, metrics on disk."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bpo_lightning import Annotator, PreferenceLoss, hookimpl
from bpo_lightning.cli import main

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


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
    assert sorted(p.name for p in (run / "checkpoints").glob("phase-*.ckpt")) == ["phase-1.ckpt", "phase-2.ckpt"]
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


@pytest.mark.slow
@pytest.mark.parametrize("members", [0, 1, 3])
def test_export_reloads_and_generates_like_the_trained_policy(tmp_path, members, capsys):
    """`bpo fit` (full fine-tuning, one LoRA, or a 3-member ensemble), then `bpo export`: the folder loads with
    plain transformers and decodes greedily exactly like the policy rebuilt from the run's checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bpo_lightning.export import module_from_run
    from bpo_lightning.sampling import GenerateSampler

    run = tmp_path / "run"
    lora = ["--model.lora=bpo_lightning.lora.LoRA", "--model.lora.r=4", f"--model.lora.members={members}"]
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            f"--trainer.default_root_dir={run}",
            f"--model.policy.init_args.cache_dir={tmp_path / 'cache'}",
            "--model.policy.init_args.steps=40",
            "--data.budget=32",
            "--data.num_phases=2",
            "--data.batch_size=8",
            "--data.sampler.init_args.max_new_tokens=16",
            "--data.sampler.init_args.progress=false",
            "--trainer.limit_val_batches=0",
            "--report.evaluate_at_start=false",
            "--model.lr=5e-3",
            *(lora if members else []),
        ]
    )
    main(["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert "exported to" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.padding_side == "right"  # the source's, not the left padding used for batched sampling
    assert tokenizer("hotel review :").input_ids[0] == tokenizer.bos_token_id  # as the policy saw its prompts
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600
    assert not any("lora" in name for name, _ in exported.named_parameters())
    module = module_from_run(run)
    greedy = GenerateSampler(num_samples=1, temperature=0, max_new_tokens=16, progress=False)
    prompts = ["hotel review : we stayed here for a week .", "phone review : i got this phone last month ."]
    with module.policy_weights():
        expected = greedy.sample(module.policy, module.tokenizer, prompts, seed=0).response_ids
    tokenizer.padding_side = "left"
    assert greedy.sample(exported, tokenizer, prompts, seed=0).response_ids == expected
    initial = AutoModelForCausalLM.from_pretrained(module.source.name_or_path)
    before = initial.state_dict()
    assert any(not torch.equal(value, before[name]) for name, value in exported.state_dict().items())  # it trained


def test_export_names_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--run:" in err and "config.yaml not found" in err


RECIPES = sorted(str(p) for p in (ROOT / "configs" / "quickstart").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[Path(r).stem for r in RECIPES])
def test_every_quickstart_recipe_runs(recipe, tmp_path, capsys):
    """Each offline recipe, shrunk to 2 phases of 16 prompts, trains and reports both phases."""
    main(
        [
            "fit",
            "--config",
            recipe,
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--model.policy.init_args.cache_dir={tmp_path / 'cache'}",
            "--model.policy.init_args.steps=40",
            "--data.budget=32",
            "--data.batch_size=8",
            "--data.sampler.init_args.max_new_tokens=16",
            "--data.sampler.init_args.progress=false",
            "--data.eval_prompts.init_args.limit=8",
        ]
    )
    out = capsys.readouterr().out
    assert "phase 1/2 | pairs" in out and "phase 2/2 | pairs" in out


def _tiny(run: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        f"--trainer.default_root_dir={run}",
        f"--model.policy.init_args.cache_dir={cache}",
        "--model.policy.init_args.steps=40",
        "--data.budget=32",
        "--data.num_phases=2",
        "--data.batch_size=8",
        "--data.sampler.init_args.max_new_tokens=12",
        "--data.sampler.init_args.progress=false",
        "--trainer.limit_val_batches=0",
        "--report.evaluate_at_start=false",
        *extra,
    ]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_another_experiment_in_the_same_run_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    """BPO with DPO, then the README's on-policy IPO line on the same config: without run identity the second run
    trained on the first run's pairs and BPO's reference log-probs, paying for no annotation."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    main(_tiny(run, cache))
    before = _files(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_tiny(run, cache, "--model.reference=initial", "--model.loss=IPOLoss"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.reference: saved 'behavior', now 'initial'" in err
    loss_line = next(line for line in err.splitlines() if "model.loss.class_path: saved" in line)
    assert "DPOLoss" in loss_line.split("now")[0] and "IPOLoss" in loss_line.split("now")[1]
    assert "--trainer.default_root_dir" in err
    assert _files(run) == before  # the refused run wrote, rewrote and deleted nothing
    # the same command with a run directory of its own is a separate experiment with its own pairs
    other = tmp_path / "onpolicy-ipo"
    main(_tiny(other, cache, "--model.reference=initial", "--model.loss=IPOLoss"))
    first = json.loads((run / "data" / "phase_0001.json").read_text())
    second = json.loads((other / "data" / "phase_0001.json").read_text())
    assert second["provenance"]["reference"] == "initial" and second["stats"]["annotated"] > 0
    pairs = [json.loads(line) for line in (other / "data" / "phase_0001.pairs.jsonl").read_text().splitlines()]
    assert any(p["reference_chosen_logps"] != p["behavior_chosen_logps"] for p in pairs)  # reference: the start
    assert first["stats"]["annotated"] > 0
    # and rerunning the identical command into its own directory is allowed (complete phases are reused)
    main(_tiny(run, cache))


def test_an_unknown_component_name_is_one_line_listing_the_registered_names(tmp_path, capsys):
    """It used to be a jsonargparse usage text ending in "Expected a dot import path string: FooLoss"."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.loss=FooLoss", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("bpo: error: model.loss: no loss named 'FooLoss' (the command line); registered: DPOLoss,")
    assert "IPOLoss" in err and "SLiCLoss" in err
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  sampler:\n    class_path: TopPSampler\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(config), "--print_config"])
    err = capsys.readouterr().err
    registered = "registered: GenerateSampler, StaticCacheSampler"
    assert f"data.sampler: no sampler named 'TopPSampler' ({config}); {registered}" in err
    with pytest.raises(SystemExit) as exit_info:  # registered names and full import paths pass through
        main(["fit", "--config", QUICKSTART, "--model.loss", "IPOLoss", "--data.evaluator=null", "--print_config"])
    assert exit_info.value.code in (0, None)


class CountedLoss(PreferenceLoss):
    """DPO's loss (arXiv 2305.18290, Eq. 7), counting its calls; registered as "Renamed"."""

    calls = 0

    def forward(self, *logps):
        type(self).calls += 1
        return super().forward(*logps)

    def pair_losses(self, h):
        return -F.logsigmoid(self.beta * h)


class LengthAnnotator(Annotator):
    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


class RenamingPlugin:
    @hookimpl
    def register_losses(self, register):
        register(CountedLoss, name="Renamed")

    @hookimpl
    def register_annotators(self, register):
        register(LengthAnnotator, name="Lengths")


def test_a_name_given_at_registration_is_a_config_shorthand(tmp_path, use_plugins, capsys):
    """`register(cls, name=...)` names the class in configs: jsonargparse resolves short names by class name only,
    so the name used to be refused by it (and the class name by bpo's own check)."""
    use_plugins(RenamingPlugin())
    loss, annotator = f"{__name__}.CountedLoss", f"{__name__}.LengthAnnotator"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.loss=Renamed", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"  loss:\n    class_path: {loss}\n    init_args:\n      beta: 0.1\n" in capsys.readouterr().out
    config = tmp_path / "renamed.yaml"
    config.write_text(
        "model:\n  loss:\n    class_path: Renamed  # a comment\n    init_args: {beta: 0.3}\n"
        "data:\n  evaluator: 'Lengths'\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"  loss:\n    class_path: {loss}\n    init_args:\n      beta: 0.3\n" in out
    assert f"  evaluator:\n    class_path: {annotator}\n" in out
    assert "  annotator:\n    class_path: bpo_lightning.RuleAnnotator\n" in out  # the quickstart's, untouched
    config.write_text("model:\n  loss: Renamed\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "-c", str(config), "--data.annotator", "Lengths", "--print_config"])
    out = capsys.readouterr().out
    assert f"  loss:\n    class_path: {loss}\n" in out and f"  annotator:\n    class_path: {annotator}\n" in out
    assert config.read_text() == "model:\n  loss: Renamed\n"  # the user's file is read, never rewritten
    with pytest.raises(SystemExit) as exit_info:  # the registered name is the shorthand, not the class name
        main(["fit", "--config", QUICKSTART, "--model.loss=CountedLoss", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no loss named 'CountedLoss'" in err and "IPOLoss, Renamed, SLiCLoss" in err


def test_a_loss_registered_under_another_name_trains(tmp_path, use_plugins, monkeypatch, capsys):
    use_plugins(RenamingPlugin())
    monkeypatch.setattr(CountedLoss, "calls", 0)
    run = tmp_path / "run"
    main(_tiny(run, tmp_path / "cache", "--data.budget=8", "--data.num_phases=1", "--data.batch_size=4",
               "--data.sampler.init_args.max_new_tokens=8", "--model.loss=Renamed"))  # fmt: skip
    assert "phase 1/1 | pairs" in capsys.readouterr().out
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert CountedLoss.calls > 0
    assert f"class_path: {__name__}.CountedLoss" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_a_run_folder_written_before_classes_moved_still_resumes(tmp_path, capsys):
    """A run folder's run.json and config.yaml name classes by the import paths of the version that wrote them.
    Rewritten to paths that still import but differ from today's (``ReviewPrompts`` from ``bpo_lightning.prompts``,
    where the task's prompts used to live; the evaluation settings' own module), the run resumes: it reuses the
    saved phase and trains only the second."""
    run = tmp_path / "run"
    main(_tiny(run, tmp_path / "cache"))
    for leftover in (run / "data").glob("phase_0001.*"):  # as if killed after phase 1
        leftover.unlink()
    (run / "checkpoints" / "phase-2.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").symlink_to("phase-1.ckpt")
    old = {
        "bpo_lightning.ReviewPrompts": "bpo_lightning.prompts.ReviewPrompts",
        "bpo_lightning.Evaluation": "bpo_lightning.evaluation.Evaluation",
    }
    for name in ("run.json", "config.yaml"):
        text = (run / name).read_text()
        for new, before in old.items():
            text = text.replace(new, before)
        (run / name).write_text(text)
    fingerprint = json.loads((run / "run.json").read_text())["fingerprint"]
    assert fingerprint["data.prompts.class_path"] == "bpo_lightning.prompts.ReviewPrompts"
    pairs = (run / "data" / "phase_0000.pairs.jsonl").read_bytes()
    capsys.readouterr()
    main(_tiny(run, tmp_path / "cache", "--ckpt_path=last"))
    assert "phase 2/2 | pairs" in capsys.readouterr().out
    assert (run / "data" / "phase_0000.pairs.jsonl").read_bytes() == pairs  # the saved phase was reused
    assert (run / "data" / "phase_0001.pairs.jsonl").exists()


def test_an_export_that_fails_half_way_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """A killed `bpo export` used to leave a folder that loaded as if complete. The export is written into a
    temporary folder and renamed: failing after the weights, before the tokenizer, leaves neither the output folder
    nor the temporary one; a second export replaces a complete folder already there."""
    from transformers import PreTrainedTokenizerBase

    run = tmp_path / "run"
    main(_tiny(run, tmp_path / "cache", "--data.num_phases=1", "--data.budget=8"))
    save = PreTrainedTokenizerBase.save_pretrained

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C between the two saves raises

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no output, no temporary folder
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an earlier export")
    main(["export", "--run", str(run), "--out", str(tmp_path / "out")])
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "stale.txt" not in names
