"""The ``bpo`` command: LightningCLI over ``BPOModule`` and ``OnlineDataModule``, plus ``bpo plugins``.

    bpo fit --config configs/quickstart.yaml          # train
    bpo fit --config configs/quickstart.yaml --print_config
    bpo validate --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    bpo test --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    bpo plugins                                       # list installed plugins and what they register
    bpo export --run runs/quickstart --out exported/  # trained policy as a transformers folder
    bpo compare runs/a runs/b --out compare.png       # several runs' phases in one figure

Plugins load before the command line is parsed, so registered class names work as config shorthands.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bpo_lightning.errors import debug_requested, one_line, reported
from bpo_lightning.plugins import PluginError, format_plugins, get_plugins


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
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    skip = ("Given value", "Subtypes", "Errors")
    reasons = [line.removeprefix("- ") for line in lines[1:] if not line.startswith(skip)]
    reasons = [r for r in reasons if "Does not validate against any of the Union" not in r and "NoneType" not in r]
    reasons = sorted(reasons, key=lambda r: "subclass" not in r)  # "… does not correspond to a subclass of …" first
    reason = key.group(2) or (reasons[0] if reasons else "invalid value")
    text = f"{key.group(1)}: {reason}"
    if given is not None and given not in text:
        text += f" (given: {given})"
    return one_line(text)[:400]


class BPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        from bpo_lightning.checkpoints import PhaseCheckpoint
        from bpo_lightning.evaluation import PhaseReport

        parser.add_lightning_class_args(PhaseReport, "report")
        parser.add_lightning_class_args(PhaseCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": "link",  # last.ckpt links to the newest phase checkpoint (no second copy)
                "checkpoint.enable_version_counter": False,  # a resumed run that redoes a phase overwrites its file
                "checkpoint.save_top_k": -1,  # keep the end of every phase
                "checkpoint.filename": "phase-{epoch}",  # 0-based, like data/phase_NNNN files
                "checkpoint.auto_insert_metric_name": False,
                "trainer.reload_dataloaders_every_n_epochs": 1,  # one epoch = one collection phase
                "trainer.gradient_clip_val": 1.0,
                "trainer.num_sanity_val_steps": 0,  # PhaseReport evaluates the start instead
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
        from bpo_lightning.identity import RunMismatch, check_run_dir, fingerprint

        config = self.config["fit"]
        try:
            check_run_dir(config.data.run_dir or config.trainer.default_root_dir, fingerprint(config))
        except RunMismatch as err:
            print(f"bpo: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def before_validate(self) -> None:
        self._consolidate_deepspeed_checkpoint()

    def before_test(self) -> None:
        self._consolidate_deepspeed_checkpoint()

    def _consolidate_deepspeed_checkpoint(self) -> None:
        """``--ckpt_path`` may be a DeepSpeed checkpoint folder from a multi-process fit: evaluated with any other
        strategy (e.g. one process), it is consolidated into a single file first."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from bpo_lightning.export import consolidated

        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt).is_dir() and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            config["ckpt_path"] = str(consolidated(ckpt))


def main(argv: list[str] | None = None) -> None:
    """The ``bpo`` command. Errors about the input are one line naming the key, file or row (``errors``);
    ``--debug`` (anywhere on the line) or ``BPO_DEBUG=1`` shows their traceback instead."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in argv:
        os.environ["BPO_DEBUG"] = "1"  # also read by the parser and by every process of a multi-process run
    debug = debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself
    try:
        _main(argv, None if from_command_line else argv)
    except Exception as err:
        problem = None if debug else _user_error(err)
        if problem is None:
            raise
        message, code = problem
        print(f"bpo: error: {message}", file=sys.stderr)
        raise SystemExit(code) from None


def _user_error(err: Exception) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error about the input, ``None`` for anything else."""
    found = reported(err)
    if found is not None:
        return one_line(found), found.exit_code
    # jsonargparse collects the errors of a nested class's __init__ into one text: "… Errors:\n  - <message>"
    for line in str(err).splitlines():
        line = line.strip().removeprefix("- ")
        if re.match(r"(model|data|trainer|checkpoint|report)\.[\w.]+:? ", line):
            return one_line(line), 2
    return None


def _main(argv: list[str], args: list[str] | None) -> None:
    try:
        plugins = get_plugins()
    except PluginError as err:
        print(f"bpo: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if argv[:1] == ["plugins"]:
        print(format_plugins(plugins))
        return
    if argv[:1] == ["compare"]:
        from bpo_lightning.plots import main as compare_main

        compare_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from bpo_lightning.export import main as export_main

        export_main(argv[1:])
        return
    problem = config_problems(argv) or unknown_component(argv, plugins) or epochs_given(argv)
    if problem:
        print(f"bpo: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
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


# config keys whose value may be a registered short name, and the registry that names it
_REGISTERED = {"model.loss": "losses", "data.annotator": "annotators", "data.evaluator": "annotators",
               "data.sampler": "samplers", "model.behavior": "behaviors", "model.policy": "policies"}  # fmt: skip


def _known(kind: str, plugins) -> set[str]:
    """Short names that ``kind`` accepts: a plugin registry, or the package's own behavior / policy classes."""
    if kind in plugins.registries:
        return set(plugins.registries[kind])
    from bpo_lightning.behavior import BehaviorUpdate
    from bpo_lightning.policy import PolicySource

    base = BehaviorUpdate if kind == "behaviors" else PolicySource
    found, todo = set(), [base]
    while todo:
        for cls in todo.pop().__subclasses__():
            found.add(cls.__name__)
            todo.append(cls)
    return found


def unknown_component(argv: list[str], plugins) -> str | None:
    """A one-line error for a short component name (no dots) that no plugin registered, given on the command line
    (``--model.loss=Name``) or in a ``--config`` file (``class_path: Name``); ``None`` when all are known."""
    import yaml

    given: list[tuple[str, str, str]] = []  # (key, name, where)
    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        key = key.removeprefix("--")
        if not sep and i + 1 < len(argv) and key in {*_REGISTERED, "config", "c"}:
            value = argv[i + 1]
        if key in _REGISTERED:
            given.append((key, value, "the command line"))
        elif key in ("config", "c") and value and Path(value).is_file():
            try:
                config = yaml.safe_load(Path(value).read_text()) or {}
            except yaml.YAMLError:
                continue  # the parser reports it
            for dotted in _REGISTERED:
                section, name = dotted.split(".")
                entry = (config.get(section) or {}).get(name) if isinstance(config, dict) else None
                entry = entry.get("class_path") if isinstance(entry, dict) else entry
                if isinstance(entry, str):
                    given.append((dotted, entry, value))
    for key, name, where in given:
        registry = _known(_REGISTERED[key], plugins)
        if name and "." not in name and name not in registry and name.lower() not in ("null", "none") and not (
            name.startswith(("{", "["))
        ):
            known = ", ".join(sorted(registry))
            return (f"{key}: no {key.split('.')[1].replace('evaluator', 'annotator')} named {name!r} ({where}); "
                    f"registered: {known} (`bpo plugins` lists them with their plugins)")  # fmt: skip
    return None


def epochs_given(argv: list[str]) -> str | None:
    """``trainer.max_epochs`` follows ``data.num_phases`` (one epoch per collection phase): setting it is an error
    that says so, instead of jsonargparse's "invalid Optional value"."""
    import yaml

    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        where = None
        if key == "--trainer.max_epochs":
            where = "on the command line"
        elif key in ("--config", "-c"):
            path = Path(value or (argv[i + 1] if i + 1 < len(argv) else ""))
            try:
                config = yaml.safe_load(path.read_text()) if path.is_file() else None
            except yaml.YAMLError:
                config = None
            trainer = config.get("trainer") if isinstance(config, dict) else None
            if isinstance(trainer, dict) and trainer.get("max_epochs") is not None:
                where = f"in {path}"
        if where:
            return (f"trainer.max_epochs is set {where}, but the number of epochs is the number of collection "
                    "phases: set data.num_phases instead (e.g. --data.num_phases 4)")  # fmt: skip
    return None


def config_problems(argv: list[str]) -> str | None:
    """A ``--config`` file that is missing or not plain YAML (a syntax error, a ``!!python`` tag), named with its line;
    jsonargparse's own message names neither the file nor the line."""
    import yaml

    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        if key not in ("--config", "-c"):
            continue
        path = Path(value if sep else (argv[i + 1] if i + 1 < len(argv) else ""))
        if not path.is_file():
            return f"--config: no file {path}"
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            return f"--config: {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            reason = getattr(err, "problem", None) or str(err)
            if "constructor for the tag" in str(reason):
                reason = f"{reason.split('for the tag', 1)[1].strip()} is a YAML tag, and only plain YAML is accepted"
            return f"--config: {path}{where}: {one_line(reason)}"
    return None
