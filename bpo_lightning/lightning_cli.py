"""The part of ``bpo`` that is Lightning's: ``bpo fit``, ``bpo validate`` and ``bpo test`` are a ``LightningCLI`` over
``BPOModule`` and ``OnlineDataModule`` (``bpo_lightning.cli`` decides which command runs, and imports this module
only for these three).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bpo_lightning.console import verbose_requested
from bpo_lightning.errors import debug_requested, one_line


class BPOParser(LightningArgumentParser):
    """The command line and config parser: a bad value is one line naming the key and the value given (jsonargparse's
    usage text and nested explanation with ``--debug`` / ``BPO_DEBUG=1``)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_requested():
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        print(f"bpo: error: {parser_message(message)} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def parser_message(message: str) -> str:
    """jsonargparse's multi-line error as one line: the key, the most specific reason, the value given."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    if key is None:
        return one_line(" ".join(lines))[:400]
    names, rest = [key.group(1)], lines[1:]
    while (
        rest
        and (nested := re.match(r'(?:- )?Parser key "([^"]+)":\s*(.*)', rest[0]))
        or (rest and rest[0].startswith("Problem with given class_path"))
    ):  # a class's own argument: data.prompts → data.prompts.init_args.split
        if nested:
            names.append(f"init_args.{nested.group(1)}" if len(names) == 1 else nested.group(1))
            if nested.group(2):
                rest = [nested.group(2), *rest[1:]]
                break
        rest = rest[1:]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    skip = ("Given value", "Subtypes", "Errors")
    reasons = [line.removeprefix("- ") for line in rest if not line.startswith(skip)]
    reasons = [r for r in reasons if "Does not validate against any of the Union" not in r and "NoneType" not in r]
    reasons = sorted(reasons, key=lambda r: "subclass" not in r)  # "… does not correspond to a subclass of …" first
    reason = (key.group(2) if len(names) == 1 else "") or (reasons[0] if reasons else "invalid value")
    text = f"{'.'.join(names)}: {reason}"
    if given is not None and given not in text:
        text += f" (given: {given})"
    return one_line(text)[:400]


class BPOCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands less ``predict``: a policy is used through ``bpo export``, not predicted with."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        from bpo_lightning.checkpoints import PhaseCheckpoint
        from bpo_lightning.reporting import PhaseReport

        parser.add_lightning_class_args(PhaseReport, "report")
        parser.add_lightning_class_args(PhaseCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": "link",  # last.ckpt links to the newest phase checkpoint (no second copy)
                "checkpoint.enable_version_counter": False,  # a resumed run that redoes a phase overwrites its file
                "checkpoint.save_top_k": -1,  # keep the end of every phase
                "checkpoint.filename": "phase-{phase}",  # phase-1.ckpt at the end of phase 1 (PhaseCheckpoint)
                "checkpoint.auto_insert_metric_name": False,
                "trainer.reload_dataloaders_every_n_epochs": 1,  # one epoch = one collection phase
                "trainer.gradient_clip_val": 1.0,
                "trainer.num_sanity_val_steps": 0,  # PhaseReport evaluates the start instead
                "trainer.enable_model_summary": verbose_requested(),  # the layer table is for --verbose
                "trainer.check_val_every_n_epoch": 1,  # evaluate after every phase
                "trainer.default_root_dir": "runs/bpo",
            }
        )
        parser.link_arguments("data.num_phases", "trainer.max_epochs")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):  # default: CSV metrics in the run directory
            config.trainer.logger = Namespace(
                class_path="bpo_lightning.logs.RunCSVLogger",
                init_args=Namespace(save_dir=config.trainer.default_root_dir, name="", version=""),
            )
        if config.checkpoint.dirpath is None:  # the same folder for fit, validate and test
            config.checkpoint.dirpath = str(Path(config.trainer.default_root_dir) / "checkpoints")
        logger = config.trainer.logger
        if self.subcommand not in (None, "fit") and isinstance(logger, Namespace) and "CSVLogger" in logger.class_path:
            # `bpo validate` / `bpo test` on a run's config.yaml log (and save their config) in a sub-folder, so the
            # fit's metrics.csv and config.yaml stay as they are
            if logger.init_args.get("version") in (None, ""):
                logger.init_args.version = self.subcommand

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path`` here first (for saved hyperparameters): a file that does not load is an
        error naming it (``checkpoints.checked_load``), not torch's unpickling traceback."""
        try:
            super()._parse_ckpt_path()
        except Exception:
            from bpo_lightning.checkpoints import checked_load

            checked_load(self.config[self.config.subcommand].get("ckpt_path"), weights_only=True)
            raise

    def before_fit(self) -> None:
        """Refuse a run directory that holds another run (``identity``), before anything in it is written."""
        from bpo_lightning.files import lock_run_dir
        from bpo_lightning.identity import RunMismatch, check_run_dir, fingerprint

        config = self.config["fit"]
        run_dir = config.data.run_dir or config.trainer.default_root_dir
        if all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK")):
            lock_run_dir(run_dir)  # one writer per run folder (processes of the same job are not launched yet)
        try:
            check_run_dir(run_dir, fingerprint(config))
        except RunMismatch as err:
            print(f"bpo: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def before_validate(self) -> None:
        self._say_what_is_evaluated()
        self._consolidate_deepspeed_checkpoint()

    def before_test(self) -> None:
        self._say_what_is_evaluated()
        self._consolidate_deepspeed_checkpoint()

    def _say_what_is_evaluated(self) -> None:
        """Without ``--ckpt_path`` the policy evaluated is the starting one: say so, it is easy to miss."""
        if not self.config_init[self.subcommand].get("ckpt_path") and self.trainer.is_global_zero:
            print(
                f"bpo {self.subcommand}: no --ckpt_path, so this evaluates the starting policy (model.policy), not "
                "a trained one; pass --ckpt_path <run>/checkpoints/last.ckpt for the trained policy",
                file=sys.stderr,
            )

    def _consolidate_deepspeed_checkpoint(self) -> None:
        """``--ckpt_path`` may be a DeepSpeed checkpoint folder from a multi-process fit: evaluated with any other
        strategy (e.g. one process), it is consolidated into a single file first."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from bpo_lightning.export import consolidated

        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt).is_dir() and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            config["ckpt_path"] = str(consolidated(ckpt))


def run(args: list[str] | None) -> None:
    """``bpo fit`` / ``validate`` / ``test``; ``args=None`` reads ``sys.argv``."""
    from bpo_lightning.data import OnlineDataModule
    from bpo_lightning.module import BPOModule

    BPOCLI(
        BPOModule,
        OnlineDataModule,
        args=args,
        parser_class=BPOParser,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # BPOModule.configure_optimizers owns the paper's AdamW + linear decay
    )
