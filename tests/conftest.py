import os

# Hub look-ups retry for ~50 s before failing offline; every test runs without the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import pytest

from bpo_lightning.annotation import Annotator
from bpo_lightning.data import OnlineDataModule
from bpo_lightning.module import BPOModule
from bpo_lightning.policy import Pretrained
from bpo_lightning.prompts import ReviewPrompts
from bpo_lightning.sampling import GenerateSampler
from bpo_lightning.tasks import reviews
from bpo_lightning.types import SampleRow


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A briefly fine-tuned tiny policy for the review task (a few seconds to build)."""
    return reviews.ensure_sft(tmp_path_factory.mktemp("sft"), steps=40, seed=0)


class CountingAnnotator(Annotator):
    """The review task's gold reward, counting every (prompt, response) it is asked to score."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [reviews.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]

    @property
    def identity(self) -> str:
        return "CountingAnnotator:gold"


def make_run(
    root,
    sft_dir,
    *,
    budget=32,
    num_phases=2,
    max_epochs=None,
    callbacks=(),
    annotator=None,
    eval_prompts=0,
    trainer_args=None,
    **module_args,
):
    """A tiny BPO run on CPU: module, datamodule, trainer (no logger, no progress bars). ``eval_prompts`` > 0
    evaluates on that many held-out prompts after every phase (and, with a ``PhaseReport``, at the start)."""
    module = BPOModule(policy=Pretrained(str(sft_dir)), lr=module_args.pop("lr", 1e-3), **module_args)
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=annotator or CountingAnnotator(),
        eval_prompts=ReviewPrompts("eval", limit=eval_prompts) if eval_prompts else None,
        sampler=GenerateSampler(max_new_tokens=16, batch_size=16, progress=False),
        budget=budget,
        num_phases=num_phases,
        batch_size=8,
        seed=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs or num_phases,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        gradient_clip_val=1.0,
        **(trainer_args or {}),
    )
    return module, data, trainer


@pytest.fixture
def use_plugins(monkeypatch):
    """Make the given in-process plugin objects part of the process-wide plugins for one test."""
    import bpo_lightning.plugins as plugins_module

    def install(*extra):
        plugins = plugins_module.load_plugins(autoload=False, extra=extra)
        monkeypatch.setattr(plugins_module, "_PLUGINS", plugins)
        return plugins

    return install


KILL_TABLE: list[dict] = []  # rows of the kill-point suite (tests/test_faults.py), printed after the run


def pytest_terminal_summary(terminalreporter):
    if not KILL_TABLE:
        return
    columns = [
        "kill point",
        "killed in",
        "weights equal",
        "re-annotations",
        "paid-then-lost",
        "files ok",
        "metrics complete",
    ]
    rows = [[str(row.get(c, "")) for c in columns] for row in KILL_TABLE]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    terminalreporter.section("kill points: killed with SIGKILL, resumed, compared with the uninterrupted run")
    for line in [columns, ["-" * w for w in widths], *rows]:
        terminalreporter.write_line(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def sample_row(index: int) -> SampleRow:
    """A minimal saved prompt of a phase: two identical responses (nothing to annotate)."""
    return SampleRow(index, "p", [1], ["a", "a"], [[2], [2]], [True, True], [None, None], "identical")
