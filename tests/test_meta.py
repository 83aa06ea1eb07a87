"""Project-wide checks: every hook is tested and documented, every module imports, every config parses."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import bpo_lightning
from bpo_lightning import hookspecs
from bpo_lightning.cli import main

ROOT = Path(__file__).parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "bpo_lightning_spec"))
MODULES = sorted(m.name for m in pkgutil.walk_packages(bpo_lightning.__path__, "bpo_lightning."))
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))


def test_there_are_hooks_modules_and_configs():
    assert {"register_losses", "register_annotators", "register_samplers", "on_pairs_ready"} <= set(HOOKS)
    assert "bpo_lightning.module" in MODULES and CONFIGS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert re.search(rf"^def test_hook_{hook}\(", (ROOT / "tests" / "test_hooks.py").read_text(), re.M)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert re.search(rf"^## {hook}$", (ROOT / "docs" / "hooks.md").read_text(), re.M)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bpo"])
    # configs/distributed/ hold only a strategy: they are a second --config on top of a recipe
    base = ["--config", str(ROOT / "configs" / "quickstart.yaml")] if config.parent.name == "distributed" else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out and "class_path:" in out
