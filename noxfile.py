"""Test matrix. `nox` runs the default sessions (lint, tests, plugins, configs); `nox -s gpu` on a CUDA machine."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "plugins", "configs"]
nox.options.default_venv_backend = "venv"

CPU_TORCH = ("-c", "constraints-cpu.txt")  # the CPU wheel of torch; a bare requirement pulls a CUDA build
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PLUGINS = sorted(str(p.parent) for p in Path("plugins").glob("*/pyproject.toml"))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff over the package, tests, plugins, benchmarks and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on CPU, fully offline."""
    session.install(*CPU_TORCH, "-e", ".[test]")
    session.run("pytest", *session.posargs, env=OFFLINE)


@nox.session
@nox.parametrize("plugin", PLUGINS, ids=[Path(p).name for p in PLUGINS])
def plugins(session: nox.Session, plugin: str) -> None:
    """Each distribution under plugins/ in a fresh environment: installed, discovered, listed, usable in a config."""
    session.install(*CPU_TORCH, ".[test]", plugin)
    session.run("bpo", "plugins", env=OFFLINE)
    session.run("pytest", f"{plugin}/tests", "-p", "no:cacheprovider", env=OFFLINE)


@nox.session
def configs(session: nox.Session) -> None:
    """Every YAML under configs/ parsed by `bpo fit --print_config`."""
    session.install(*CPU_TORCH, ".[test]")
    session.run("pytest", "tests/test_meta.py", "-k", "config", "-p", "no:cacheprovider", env=OFFLINE)


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """GPU smoke tests; they skip cleanly without CUDA. Install your CUDA build of torch first (see README)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "gpu", "tests", *session.posargs, env=OFFLINE)
