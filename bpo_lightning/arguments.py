"""The arguments a component was built with, recorded automatically: a plugin's provenance cannot be forgotten.

Samplers and annotators record the arguments of their outermost ``__init__`` call (defaults filled in). The default
``Sampler.settings()`` and ``Annotator.identity`` are built from them, so a plugin that defines neither still has
its settings saved with every phase and compared on resume, and its scores keyed by them in the annotation cache.
"""

from __future__ import annotations

import functools
import inspect
import json

# arguments that change how a component reports progress, not what it produces
NOT_PROVENANCE = frozenset({"progress", "verbose"})


class RecordsArguments:
    """Mixin: ``self.arguments`` holds the arguments the object was built with (by name, JSON-safe).

    ``not_provenance`` names a class's arguments that change how it computes, not what it produces (a block's
    batching, an endpoint's URL or timeout): they are left out of ``self.arguments``, and so of the default
    ``settings()`` / ``identity``, and out of the run identity (``identity.fingerprint``). This one declaration is
    what both the phase files and ``run.json`` read."""

    arguments: dict = {}  # noqa: RUF012 (never mutated: each object gets its own)
    not_provenance: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_arguments", False):
            return

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "arguments" not in self.__dict__:  # the class being built, not a parent's __init__ it calls
                bound = _bound(init, self, args, kw)
                self.arguments = {k: v for k, v in bound.items() if k not in type(self).not_provenance}
            init(self, *args, **kw)

        recording_init._records_arguments = True
        cls.__init__ = recording_init


def _bound(init, self, args: tuple, kwargs: dict) -> dict:
    try:
        bound = inspect.signature(init).bind(self, *args, **kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    values = {}
    for name, parameter in list(inspect.signature(init).parameters.items())[1:]:
        value = bound.arguments.get(name)
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value or {})
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            values[name] = value
    return {k: json.loads(json.dumps(v, default=repr)) for k, v in values.items() if k not in NOT_PROVENANCE}


def not_provenance(cls: type) -> frozenset[str]:
    """The arguments of ``cls`` that are not provenance: its declared ones and ``NOT_PROVENANCE``."""
    return NOT_PROVENANCE | frozenset(getattr(cls, "not_provenance", ()))


def describe(obj, arguments: dict) -> str:
    """``module.Class(name=value, …)``: a stable text naming a component and its arguments."""
    cls = type(obj)
    inner = ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(arguments.items()))
    return f"{cls.__module__}.{cls.__qualname__}({inner})"
