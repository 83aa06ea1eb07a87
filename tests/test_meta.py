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


def _layers() -> dict[str, int]:
    """The layer map of ``bpo_lightning/__init__.py``'s docstring: module -> layer (0 lowest)."""
    layers, current = {}, None
    for line in bpo_lightning.__doc__.splitlines():
        row = re.match(r"^    (\d) \w+\s+(.*)$", line)
        if row:
            current = int(row.group(1))
            names = row.group(2)
        elif current is not None and re.match(r"^ {18}\S", line):  # a continued row
            names = line
        else:
            current = None
            continue
        layers.update(dict.fromkeys(names.split(), current))
    return layers


def _imports(path: Path, package: str) -> set[str]:
    """The bpo_lightning modules ``path`` imports (at module level or inside functions), type-only imports aside."""
    import ast

    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: within the module's package
            found.add(".".join(filter(None, [package, node.module])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bpo_lightning"):
            found.add(node.module.removeprefix("bpo_lightning").lstrip("."))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("bpo_lightning").lstrip(".")
                for a in node.names
                if a.name.startswith("bpo_lightning")
            )
    return found - {""}  # the package root re-exports lazily: importable from anywhere


def test_no_module_imports_from_a_higher_layer():
    layers = _layers()
    root = Path(bpo_lightning.__file__).parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): p for name, p in modules.items() if name != "__init__"}
    assert sorted(set(modules) - set(layers)) == []  # every module is placed in the map
    assert sorted(set(layers) - set(modules)) == []  # and the map names no module that is gone
    upward = []
    for name, path in modules.items():
        package = name.rpartition(".")[0] if path.name != "__init__.py" else name
        for dep in _imports(path, package):
            if layers[dep] > layers[name]:
                upward.append(f"{name} (layer {layers[name]}) imports {dep} (layer {layers[dep]})")
    assert upward == []
