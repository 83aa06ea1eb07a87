"""What a new user sees: `bpo --help` at once and without torch, our own lines and bars only, `--verbose` for the
libraries' logs, and something printed at least every ~10 s of a run."""

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
COMMANDS = ("fit", "validate", "test", "plugins", "compare", "export")
# what Lightning, DeepSpeed, transformers, datasets and torch print in a default run
NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "Setting accelerator to CPU",
    "loss_type=None",
    "Generating train split",
    "Loading weights",
    "Writing model shards",
    "_pytree",
    "LeafSpec",
    "logging interval",
    "| Name",
    "┃ Name",
    "Trainable params",
    "Seed set to",
)


def _bpo(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bpo_lightning", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_help_lists_the_six_commands(args):
    started = time.perf_counter()
    done = _bpo(*args)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "plugins", "compare", "export"]  # written out: a lost one fails
    assert "predict" not in done.stdout and "Lightning Trainer command line tool" not in done.stdout
    assert "--debug" in done.stdout and "--verbose" in done.stdout and "docs" in done.stdout
    print(f"`bpo {' '.join(args)}` took {took:.2f}s")


def test_help_and_the_cli_module_import_no_torch():
    code = (
        "import sys, io, contextlib, bpo_lightning.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['--help'])\n"
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'datasets', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from bpo_lightning import DPOLoss, EMA, hookimpl\nimport bpo_lightning\n"
        "assert all(getattr(bpo_lightning, name) is not None for name in bpo_lightning.__all__)\n"
        "assert DPOLoss.__module__ == 'bpo_lightning.losses'\n"
        "assert EMA.__module__ == 'bpo_lightning.behavior'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_listing_plugins_imports_torch_only():
    """``bpo plugins`` needs the plugin classes (losses are torch modules), not transformers, Lightning or DeepSpeed."""
    code = (
        "import sys, io, contextlib, bpo_lightning.cli as cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n    cli.main(['plugins'])\n"
        "assert 'StaticCacheSampler' in out.getvalue() and 'DPOLoss' in out.getvalue(), out.getvalue()\n"
        "heavy = [m for m in ('lightning', 'transformers', 'datasets', 'deepspeed', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", ["predict", "train"])
def test_a_command_that_is_not_ours_is_one_line(command):
    done = _bpo(command, "--config", QUICKSTART)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bpo: error: '{command}' is not a bpo command")
    assert all(name in lines[0] for name in COMMANDS)


def _timed_run(args: list[str], env: dict, timeout: float = 600) -> tuple[str, list[float], float]:
    """Run `bpo` with stdout and stderr together; the text, the times (from the start) at which each line or bar
    update (a `\\n` or `\\r`) came, and the run's total time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **env}
    start = time.monotonic()
    chunks, times = [], [0.0]
    command = [sys.executable, "-m", "bpo_lightning", *args]
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT) as proc,
        selectors.DefaultSelector() as selector,
    ):
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if time.monotonic() - start > timeout:
                proc.kill()
                pytest.fail(f"bpo {' '.join(args)} ran past {timeout}s")
            if not selector.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
            times += [time.monotonic() - start] * (chunk.count(b"\n") + chunk.count(b"\r"))
    total = time.monotonic() - start
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    return text, times + [total], total


def _small_fit(tmp_path: Path, run: str, budget: int, phases: int) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        f"--trainer.default_root_dir={tmp_path / run}",
        f"--model.policy.init_args.cache_dir={tmp_path / 'cache'}",
        "--model.policy.init_args.steps=40",
        f"--data.budget={budget}",
        f"--data.num_phases={phases}",
        "--data.batch_size=8",
        "--data.sampler.init_args.max_new_tokens=16",
        "--data.eval_prompts.init_args.limit=16",
    ]


@pytest.mark.slow
def test_a_fit_prints_our_lines_only_and_something_every_few_seconds(tmp_path):
    """The shrunk quickstart, from an empty cache: no library noise, the phase lines, the SFT build announced, and no
    silence longer than ~10 s. A loaded machine stretches every step: the bound grows to a quarter of the run, or to
    what importing the libraries alone takes here (one step that bpo cannot cut)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, transformers, lightning.pytorch"], check=True, timeout=300)
    imports = time.monotonic() - started
    text, times, total = _timed_run(_small_fit(tmp_path, "run", 64, 2), env={"BPO_VERBOSE": ""})
    found = [noise for noise in NOISE if noise in text]
    assert not found, (found, text[-3000:])
    assert "building the starting policy (40 SFT steps" in text
    assert "bpo fit: loading PyTorch" in text and "start     | eval win rate" in text
    assert "phase 1/2 | pairs" in text and "phase 2/2 | pairs" in text
    assert "KL(policy‖behavior)" in text and " ± " in text
    assert "starting policy: SFT" in text and "phase 1: training" in text and "phase 2: evaluating" in text
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    print(f"run {total:.1f}s, longest time without output {gap:.1f}s (importing the libraries: {imports:.1f}s)")
    assert gap <= max(10.0, 0.25 * total, 1.5 * imports)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "phase-1.ckpt",
        "phase-2.ckpt",
    ]

    # --verbose brings the libraries' lines back (the starting policy is built by now)
    text, _, _ = _timed_run([*_small_fit(tmp_path, "verbose", 16, 1), "--verbose"], env={"BPO_VERBOSE": ""})
    assert "GPU available" in text and "phase 1/1 | pairs" in text


def test_checkpoint_files_count_phases_from_one(tmp_path):
    import torch

    from bpo_lightning.checkpoints import PhaseCheckpoint

    checkpoint = PhaseCheckpoint(dirpath=tmp_path, filename="phase-{phase}", auto_insert_metric_name=False)
    assert Path(checkpoint.format_checkpoint_name({"epoch": torch.tensor(0), "step": torch.tensor(4)})).name == (
        "phase-1.ckpt"
    )
    lightning_style = PhaseCheckpoint(dirpath=tmp_path, filename="phase-{epoch}", auto_insert_metric_name=False)
    assert Path(lightning_style.format_checkpoint_name({"epoch": torch.tensor(0)})).name == "phase-0.ckpt"


def test_the_phase_line_gives_kl_with_its_standard_error():
    from bpo_lightning.reporting import _describe

    line = _describe(
        {
            "win_rate": 0.5,
            "tie_rate": 0.0,
            "kl_initial": 1.927,
            "kl_initial_stderr": 0.596,
            "kl_behavior": 0.098,
            "kl_behavior_stderr": 0.039,
        }
    )
    assert "KL(policy‖initial) 1.927 ± 0.596" in line and "KL(policy‖behavior) 0.098 ± 0.039" in line
    assert _describe({"win_rate": 0.5, "tie_rate": 0.0, "kl_behavior": 0.1}).endswith("KL(policy‖behavior) 0.100")
