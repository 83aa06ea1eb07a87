"""Plugin loading: built-in components and third-party distributions, one mechanism for both.

Built-ins are the modules in ``DEFAULT_PLUGINS``; third-party plugins are entry points of the group
``bpo_lightning``. ``BPO_DISABLE_PLUGIN_AUTOLOAD=1`` skips the entry points. ``bpo plugins`` prints what loaded.
Discovery hooks run once, in ``load_plugins()``; the training loop only ever touches the resulting registries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from bpo_lightning import hookspecs

ENTRY_POINT_GROUP = "bpo_lightning"
AUTOLOAD_ENV = "BPO_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = (
    "bpo_lightning.losses",
    "bpo_lightning.sampling",
    "bpo_lightning.engine",
    "bpo_lightning.annotation",
    "bpo_lightning.judge",
)
# kind -> (discovery hook, "module:Base" every registered class must subclass)
KINDS = {
    "losses": ("register_losses", "bpo_lightning.losses:PreferenceLoss"),
    "annotators": ("register_annotators", "bpo_lightning.annotation:Annotator"),
    "samplers": ("register_samplers", "bpo_lightning.sampling:Sampler"),
}
SINGULAR = {"losses": "loss", "annotators": "annotator", "samplers": "sampler"}


class PluginError(RuntimeError):
    """A plugin could not be loaded; the message names the distribution, the entry point and the problem."""


@dataclass
class PluginInfo:
    """Where a plugin comes from and what it registered."""

    distribution: str
    version: str
    module: str
    entry_point: str | None = None  # "name = value" for third-party plugins, None for built-ins
    registered: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        where = f"entry point '{self.entry_point}'" if self.entry_point else "built-in"
        return f"distribution '{self.distribution} {self.version}' ({where}, module {self.module})"


@dataclass
class Plugins:
    """The plugin manager plus the registries its discovery hooks filled."""

    manager: pluggy.PluginManager
    infos: list[PluginInfo]
    registries: dict[str, dict[str, type]]

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def get(self, kind: str, name: str) -> type:
        try:
            return self.registries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.registries[kind])) or "none"
            raise KeyError(f"no {SINGULAR[kind]} named {name!r}; registered: {known}") from None


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = load_plugins()
    return _PLUGINS


def load_plugins(autoload: bool | None = None, extra: tuple = ()) -> Plugins:
    """Load built-in and (unless disabled) entry-point plugins, then run the discovery hooks once.

    Args:
        autoload: load entry-point plugins; default: unless ``BPO_DISABLE_PLUGIN_AUTOLOAD=1``.
        extra: further plugin objects (modules, classes or instances with hook implementations) to register,
            e.g. from a script or a test.

    Raises:
        PluginError: a plugin failed to import, implements an unknown hook, registers a class that is not of
            the right kind, or reuses a registered name.
    """
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}
    manager = pluggy.PluginManager("bpo_lightning")
    manager.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    version = _version("bpo-lightning")
    for module_name in DEFAULT_PLUGINS:
        _register(
            manager, infos, importlib.import_module(module_name), PluginInfo("bpo-lightning", version, module_name)
        )
    if autoload:
        for ep in _entry_points():
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "unknown"
            info = PluginInfo(dist, ep.dist.version if ep.dist else "?", ep.module, f"{ep.name} = {ep.value}")
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(
                    f"plugin from {info.describe()} failed to import: {type(err).__name__}: {err}"
                ) from err
            _register(manager, infos, plugin, info)
    for plugin in extra:
        module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", repr(plugin))
        _register(manager, infos, plugin, PluginInfo("(in-process)", "-", f"{module}@{id(plugin):x}"))
    registries = {kind: {} for kind in KINDS}
    for kind, (hook_name, base_path) in KINDS.items():
        base = _import_object(base_path)
        for impl in getattr(manager.hook, hook_name).get_hookimpls():  # registration order: built-ins first
            info = infos[impl.plugin_name]
            register = _registrar(kind, base, registries[kind], info, infos)
            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except PluginError:
                raise
            except Exception as err:
                raise PluginError(f"{hook_name} of {info.describe()} raised {type(err).__name__}: {err}") from err
    return Plugins(manager, list(infos.values()), registries)


def format_plugins(plugins: Plugins) -> str:
    """The text ``bpo plugins`` prints: one block per plugin, its registered classes by kind."""
    lines = []
    for info in plugins.infos:
        origin = f"entry point: {info.entry_point}" if info.entry_point else "built-in"
        lines.append(f"{info.distribution} {info.version}  module: {info.module}  ({origin})")
        for kind, names in info.registered.items():
            lines.append(f"    {kind}: {', '.join(names)}")
        if not info.registered:
            lines.append("    (registers no components; implements observation hooks only)")
    return "\n".join(lines)


def _register(manager: pluggy.PluginManager, infos: dict[str, PluginInfo], plugin: Any, info: PluginInfo) -> None:
    name = info.entry_point or info.module
    if name in infos or manager.is_registered(plugin):
        return  # the same distribution seen twice on sys.path
    try:
        manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as err:
        manager.unregister(name=name)
        raise PluginError(f"plugin from {info.describe()} does not fit the hook contract: {err}") from err
    infos[name] = info


def _registrar(kind: str, base: type, registry: dict[str, type], info: PluginInfo, infos: dict[str, PluginInfo]):
    def register(cls: type, name: str | None = None) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin from {info.describe()} registered {cls!r} as one of the {kind}, "
                f"but it is not a subclass of {base.__module__}.{base.__qualname__}"
            )
        key = name or cls.__name__
        if key in registry and registry[key] is not cls:
            owner = next((i for i in infos.values() if key in i.registered.get(kind, [])), None)
            raise PluginError(
                f"plugin from {info.describe()} registered {SINGULAR[kind]} {key!r}, a name already taken"
                + (f" by {owner.describe()}" if owner else "")
            )
        if key not in registry:
            registry[key] = cls
            info.registered.setdefault(kind, []).append(key)

    return register


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    seen, unique = set(), []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.dist.metadata["Name"] if ep.dist else None, ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return unique


def _import_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
