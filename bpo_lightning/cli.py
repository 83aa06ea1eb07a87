"""The ``bpo`` command: ``fit``, ``validate`` and ``test`` are a LightningCLI over ``BPOModule`` and
``OnlineDataModule`` (``lightning_cli``); ``plugins``, ``compare`` and ``export`` are our own.

    bpo fit --config configs/quickstart.yaml          # train
    bpo fit --config configs/quickstart.yaml --print_config
    bpo validate --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    bpo test --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    bpo plugins                                       # list installed plugins and what they register
    bpo export --run runs/quickstart --out exported/  # trained policy as a transformers folder
    bpo compare runs/a runs/b --out compare.png       # several runs' phases in one figure

Plugins load before the command line is parsed, so registered names work as config shorthands. ``bpo`` and
``bpo --help`` import neither torch nor Lightning: they answer at once. The libraries' own logs are silenced
(``console``) unless ``--verbose``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bpo_lightning.console import VERBOSE_ENV
from bpo_lightning.errors import debug_requested, one_line, reported

# every command, in the order ``bpo --help`` lists them; the first three are Lightning's (``lightning_cli``)
COMMANDS = {
    "fit": "train: collect, annotate and train on each phase in turn (bpo fit --config configs/quickstart.yaml)",
    "validate": "evaluate a checkpoint on the held-out prompts (--config <run>/config.yaml --ckpt_path …)",
    "test": "evaluate a checkpoint on data.test_prompts (default: the held-out prompts)",
    "plugins": "list the installed plugins and the losses, annotators and samplers they register",
    "compare": "plot several runs' phases in one figure (bpo compare runs/a runs/b --out compare.png)",
    "export": "write a run's trained policy as a transformers folder (bpo export --run runs/a --out exported/)",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def usage() -> str:
    """The text of ``bpo`` / ``bpo --help``: the commands, where the docs are, ``--debug`` and ``--verbose``."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    where = f"{docs.parent / 'README.md'} and {docs}/" if docs.is_dir() else "README.md and docs/ of bpo-lightning"
    width = max(map(len, COMMANDS))
    lines = [
        "usage: bpo <command> [options]",
        "",
        "Online preference alignment of LLMs (BPO) on PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "`bpo <command> --help` lists a command's options; `bpo fit --config FILE --print_config` prints every "
        "setting.",
        "--debug (anywhere on the line, or BPO_DEBUG=1): tracebacks instead of one-line errors.",
        "--verbose (or BPO_VERBOSE=1): the logs and progress bars of Lightning, transformers, datasets and DeepSpeed.",
        f"Docs: {where} (errors: troubleshooting.md).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``bpo`` command. Errors about the input are one line naming the key, file or row (``errors``);
    ``--debug`` (anywhere on the line) or ``BPO_DEBUG=1`` shows their traceback instead."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if from_command_line:
        _dump_stacks_on_sigusr1()
        return _command(argv, True)
    switches = {name: os.environ.get(name) for name in ("BPO_DEBUG", VERBOSE_ENV)}
    try:  # called from Python: --debug / --verbose last as long as this call
        return _command(argv, False)
    finally:
        for name, value in switches.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints where every thread of this process is (Python's ``faulthandler``), and the run
    goes on: how to see where a process of a stalled multi-process job waits."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def _command(argv: list[str], from_command_line: bool) -> None:
    if "--debug" in argv:
        os.environ["BPO_DEBUG"] = "1"  # also read by the parser and by every process of a multi-process run
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"
    debug = debug_requested()
    argv = [arg for arg in argv if arg not in ("--debug", "--verbose")]
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself
    if argv in ([], ["-h"], ["--help"]):
        print(usage())
        return
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(
            f"bpo: error: {argv[0]!r} is not a bpo command; the commands are {', '.join(COMMANDS)} (see `bpo --help`)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        _main(argv, None if from_command_line else argv)
    except SystemExit as err:  # Lightning ends a fit that received SIGTERM with SystemExit(None): status 0
        if type(err).__name__ != "SIGTERMException":
            raise
        print(
            "bpo: error: stopped by SIGTERM during training; the phases collected and the last phase checkpoint "
            "are saved: the same command with --ckpt_path last continues",
            file=sys.stderr,
        )
        raise SystemExit(143) from None
    except Exception as err:
        problem = None if debug else _user_error(err)
        if problem is None:
            raise
        message, code = problem
        if not getattr(err, "_bpo_reported", False):  # the datamodule said it already (OnlineDataModule.on_exception)
            print(f"bpo: error: {message}", file=sys.stderr)
        if _lost_peer(err):  # the job is broken: no interpreter teardown that waits on it, nor on the launcher
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise SystemExit(code) from None


def _lost_peer(err: Exception) -> bool:
    """Whether ``err`` is a collective that lost another process of the job (``distributed.peer_failure``)."""
    if "bpo_lightning.distributed" not in sys.modules:  # no job's collectives without it
        return False
    from bpo_lightning.distributed import peer_failure

    return peer_failure(err) is not None


def _user_error(err: Exception) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error about the input, ``None`` for anything else."""
    found = reported(err)
    if found is not None:
        return one_line(found), found.exit_code
    from bpo_lightning.distributed import peer_failure

    lost = peer_failure(err)
    if lost is not None:
        return lost, 1
    # jsonargparse collects the errors of a nested class's __init__ into one text: "… Errors:\n  - <message>"
    for line in str(err).splitlines():
        line = line.strip().removeprefix("- ")
        if re.match(r"(model|data|trainer|checkpoint|report)\.[\w.]+:? ", line):
            return one_line(line), 2
    return None


def _main(argv: list[str], args: list[str] | None) -> None:
    options = {arg.split("=", 1)[0] for arg in argv}
    first = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"  # not a re-executed child
    if argv[0] in LIGHTNING_COMMANDS and first and not options & {"-h", "--help", "--print_config"}:
        # the libraries take seconds to import: say so before the first of them
        print(f"bpo {argv[0]}: loading PyTorch, transformers and Lightning …", file=sys.stderr, flush=True)
    from bpo_lightning.console import quiet_third_party
    from bpo_lightning.plugins import PluginError, format_plugins, get_plugins

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

        with quiet_third_party():
            compare_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from bpo_lightning.export import main as export_main

        with quiet_third_party():
            export_main(argv[1:])
        return
    problem = config_problems(argv) or unknown_component(argv, plugins) or epochs_given(argv)
    if problem:
        print(f"bpo: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    from bpo_lightning.lightning_cli import run

    with quiet_third_party(), registered_names_resolved(argv, plugins) as resolved:
        if args is None:  # LightningCLI reads sys.argv, and so do the processes a multi-process run re-executes
            sys.argv[1:] = resolved
        run(None if args is None else resolved)


# config keys whose value may be a registered short name, and the registry that names it
_REGISTERED = {
    "model.loss": "losses",
    "data.annotator": "annotators",
    "data.evaluator": "annotators",
    "data.sampler": "samplers",
    "model.behavior": "behaviors",
    "model.policy": "policies",
}


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


def import_paths(plugins) -> dict[str, dict[str, str]]:
    """kind -> {registered name: its class's import path} for the names given with ``register(cls, name=...)``:
    jsonargparse looks a short name up among the class names of the subclasses, so it finds no other name."""
    return {
        kind: {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in registry.items() if name != cls.__name__}
        for kind, registry in plugins.registries.items()
    }


@contextmanager
def registered_names_resolved(argv: list[str], plugins):
    """``argv`` with each registered short name that jsonargparse cannot resolve itself (``import_paths``) replaced
    by its class's import path: a value of ``--model.loss`` / ``data.annotator`` / ``data.evaluator`` /
    ``data.sampler`` (or of its ``.class_path``, or its ``class_path`` in a YAML/JSON value), and the same keys in a
    ``--config`` file, which is then read from a rewritten copy (the rest of the file byte for byte) that lasts as
    long as this context. Class names and import paths pass through, as does every file that needs no change."""
    paths = {kind: names for kind, names in import_paths(plugins).items() if names}
    registered = {key: kind for key, kind in _REGISTERED.items() if kind in paths}
    in_config = [(tuple(key.split(".")), kind) for key, kind in registered.items()]
    resolved = list(argv)
    with ExitStack() as stack:
        folder = None
        for i, arg in enumerate(argv if registered else ()):
            key, sep, value = arg.partition("=")
            at = i if sep else i + 1  # `--key=value` or `--key value`
            if not sep:
                value = argv[at] if at < len(argv) else ""
            name = key.removeprefix("--").removesuffix(".class_path")
            if key.startswith("--") and name in registered:
                text = _resolved_text(value, [((), registered[name])], paths)
                if text is not None:
                    resolved[at] = f"{key}={text}" if sep else text
            elif key in ("--config", "-c") and value and Path(value).is_file():
                text = _resolved_text(Path(value).read_text(encoding="utf-8"), in_config, paths)
                if text is not None:
                    if folder is None:
                        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bpo-config-")))
                    copy = folder / str(i) / Path(value).name  # the file's own name, for messages naming it
                    copy.parent.mkdir()
                    copy.write_text(text, encoding="utf-8")
                    resolved[at] = f"{key}={copy}" if sep else str(copy)
        yield resolved


def _resolved_text(text: str, locations: list[tuple[tuple[str, ...], str]], paths) -> str | None:
    """``text`` (YAML) with the registered short name at each (keys, kind) location (a plain value or a mapping's
    ``class_path``) replaced by its import path, everything else as it was; ``None`` when nothing changes."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None  # the parser reports it
    spans = set()
    for keys, kind in locations:
        node = root
        for key in keys:
            node = _child(node, key)
        if isinstance(node, yaml.MappingNode):
            node = _child(node, "class_path")
        if not isinstance(node, yaml.ScalarNode) or node.value not in paths[kind]:
            continue
        start, end = node.start_mark.index, node.end_mark.index
        if text[start:end] in (node.value, f'"{node.value}"', f"'{node.value}'"):  # not an anchor, a block scalar
            spans.add((start, end, paths[kind][node.value]))
    for start, end, path in sorted(spans, reverse=True):
        text = text[:start] + path + text[end:]
    return text if spans else None


def _child(node, key: str):
    """The value node of ``key`` in a YAML mapping node (the last one, as loading keeps), else ``None``."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    found = [value for name, value in node.value if isinstance(name, yaml.ScalarNode) and name.value == key]
    return found[-1] if found else None


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
        if (
            name
            and "." not in name
            and name not in registry
            and name.lower() not in ("null", "none")
            and not (name.startswith(("{", "[")))
        ):
            known = ", ".join(sorted(registry))
            return (
                f"{key}: no {key.split('.')[1].replace('evaluator', 'annotator')} named {name!r} ({where}); "
                f"registered: {known} (`bpo plugins` lists them with their plugins)"
            )
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
            return (
                f"trainer.max_epochs is set {where}, but the number of epochs is the number of collection "
                "phases: set data.num_phases instead (e.g. --data.num_phases 4)"
            )
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
