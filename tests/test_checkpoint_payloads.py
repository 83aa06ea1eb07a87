"""No checkpoint runs code when ``bpo`` reads it: a crafted ``.ckpt`` file or DeepSpeed checkpoint folder whose pickle
would call a function on load is refused in one line by every command that reads checkpoints (``bpo export``,
``bpo validate``, ``bpo test``, ``bpo fit --ckpt_path``), and the function never runs.

The payload's ``__reduce__`` names ``os.mkdir``: unpickled with ``weights_only=False`` it creates a marker folder,
so "the marker does not exist" is what "no code ran" means here. Each test checks first that the payload really runs
under a plain ``torch.load(weights_only=False)``, so a test cannot pass because the payload is inert.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpo_lightning.cli import main
from bpo_lightning.errors import InputError
from bpo_lightning.export import load_checkpoint

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the marker appears when the pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bpo"])
    monkeypatch.delenv("BPO_DEBUG", raising=False)


def crafted_file(path: Path, marker: Path) -> Path:
    """A Lightning-shaped checkpoint file (``state_dict``, ``bpo``) carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "bpo": {}, "x": Payload(marker)}, path)
    return path


def crafted_folder(path: Path, marker: Path) -> Path:
    """A DeepSpeed checkpoint folder (``latest`` naming its tag, ZeRO-2 model and optimizer states) whose every
    ``.pt`` file carries the payload."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    model = {"module": None, "buffer_names": [], "param_shapes": [{}], "x": Payload(marker)}
    torch.save(model, tag / "mp_rank_00_model_states.pt")
    optim = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1}, "x": Payload(marker)}
    torch.save(optim, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return path


def assert_live(file: Path, marker: Path) -> None:
    """The payload runs when unpickled without the weights-only guard (then the marker is removed again)."""
    torch.load(file, weights_only=False)
    assert marker.exists()
    marker.rmdir()


def bpo(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bpo: error:") or "error:" in line[:20]]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert "\x1b" not in lines[0]  # no terminal escapes in the line
    return exit_info.value.code, lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-phase quickstart run: the config that ``export``, ``validate`` and ``test`` rebuild."""
    root = tmp_path_factory.mktemp("run")
    run = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["bpo"])
        main(
            [
                "fit",
                "--config",
                QUICKSTART,
                f"--trainer.default_root_dir={run}",
                f"--model.policy.init_args.cache_dir={root / 'cache'}",
                "--model.policy.init_args.steps=40",
                "--data.budget=8",
                "--data.num_phases=1",
                "--data.batch_size=4",
                "--data.sampler.init_args.max_new_tokens=8",
                "--data.sampler.init_args.batch_size=8",
                "--data.sampler.init_args.progress=false",
                "--data.eval_prompts.init_args.limit=4",
                "--report.evaluate_at_start=false",
            ]
        )
    return run


def test_the_weights_only_guard_refuses_a_payload_and_names_it(tmp_path):
    from bpo_lightning.checkpoints import weights_only_loads

    marker = tmp_path / "ran"
    file = crafted_file(tmp_path / "x.ckpt", marker)
    assert_live(file, marker)
    with weights_only_loads("--ckpt"), pytest.raises(InputError, match=r"--ckpt: .*x\.ckpt is refused.*posix\.mkdir"):
        torch.load(file, weights_only=False)  # what DeepSpeed's readers ask for
    assert not marker.exists()
    assert torch.load(file, weights_only=False) is not None and marker.exists()  # the guard is gone after the block


def test_a_deepspeed_folder_payload_is_refused_by_the_consolidation(tmp_path):
    marker = tmp_path / "ran"
    folder = crafted_folder(tmp_path / "x.ckpt", marker)
    assert_live(folder / "checkpoint" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(InputError, match="is refused: it holds Python objects"):
        load_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_export_refuses_a_crafted_checkpoint_without_running_it(kind, trained_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    craft = crafted_folder if kind == "folder" else crafted_file
    ckpt = craft(tmp_path / "x.ckpt", marker)
    code, line = bpo(capsys, ["export", "--run", str(trained_run), "--ckpt", str(ckpt), "--out", str(tmp_path / "o")])
    assert code == 2 and "is refused: it holds Python objects (posix.mkdir)" in line, line
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["validate", "test"])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_validate_and_test_refuse_a_crafted_checkpoint_without_running_it(command, kind, trained_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    craft = crafted_folder if kind == "folder" else crafted_file
    ckpt = craft(tmp_path / "x.ckpt", marker)
    code, line = bpo(capsys, [command, "--config", str(trained_run / "config.yaml"), f"--ckpt_path={ckpt}"])
    assert code == 2 and "is refused: it holds Python objects (posix.mkdir)" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_fit_refuses_to_resume_from_a_crafted_checkpoint_without_running_it(kind, trained_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    craft = crafted_folder if kind == "folder" else crafted_file
    ckpt = craft(tmp_path / "x.ckpt", marker)
    config = trained_run / "config.yaml"
    code, line = bpo(
        capsys, ["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'r'}", f"--ckpt_path={ckpt}"]
    )
    assert code == 2 and str(ckpt) in line, line
    assert not marker.exists()


@pytest.mark.slow
def test_a_deepspeed_resume_refuses_a_crafted_folder_without_running_it(trained_run, tmp_path):
    """``bpo fit`` under the DeepSpeed strategy (its CPU variant of tests/distributed) resumes through DeepSpeed's
    engine, which unpickles with ``weights_only=False``: the crafted folder is refused there. A subprocess, as the
    strategy initialises a process group."""
    marker = tmp_path / "ran"
    ckpt = crafted_folder(tmp_path / "x.ckpt", marker)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "distributed"), "OMP_NUM_THREADS": "1"}
    env.pop("BPO_DEBUG", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bpo_lightning",
            "fit",
            "--config",
            str(trained_run / "config.yaml"),
            f"--trainer.default_root_dir={tmp_path / 'r'}",
            "--trainer.strategy=cpu_deepspeed.CPUDeepSpeedStrategy",
            "--trainer.strategy.process_group_backend=gloo",
            f"--ckpt_path={ckpt}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("bpo: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "is refused: it holds Python objects (posix.mkdir)" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not marker.exists()
