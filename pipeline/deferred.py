"""Modules a library imports but trialpipe never uses, imported on first use instead.

Great Expectations imports ``scipy.stats`` and ``altair`` for expectations and charts
trialpipe never runs: half its import time. deid imports ``matplotlib`` and its ``pyplot``
(and picks a backend) to draw cleaned images as pictures, which trialpipe never asks for: a
sixth of every task process's start-up. A stand-in takes each such module's place in
``sys.modules``; the first use of any of its attributes imports the real module, which then
takes the stand-in's place (a library holding the stand-in reaches the real module through
it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterable
from typing import Any


class _StandIn(types.ModuleType):
    """A module not imported yet: any attribute but those set here imports it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(self.__name__), name)


class _KeptCall:
    """A function of a module not imported yet that a library calls when it is itself
    imported (deid's ``matplotlib.use("pdf")``): each call is kept and made on the real
    module once it is imported, or made at once if it is."""

    def __init__(self, module: str, function: str) -> None:
        self.module, self.function = module, function
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        imported = sys.modules.get(self.module)
        if imported is not None and not isinstance(imported, _StandIn):
            getattr(imported, self.function)(*args, **kwargs)
        else:
            self.calls.append((args, kwargs))

    def replay(self, imported: types.ModuleType) -> None:
        for args, kwargs in self.calls:
            getattr(imported, self.function)(*args, **kwargs)


# The functions a stand-in answers itself, without importing its module.
_KEPT_CALLS = {"matplotlib": "use"}


def defer(names: Iterable[str]) -> None:
    """Put stand-ins for ``names`` (parents before their submodules) in ``sys.modules``;
    a module already imported, or not installed, is left as it is."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # imports a parent package (or its stand-in)
        if spec is None:
            continue
        module = _StandIn(name)
        module.__spec__, module.__loader__ = spec, spec.loader
        if spec.submodule_search_locations is not None:
            # A package's submodules are found without importing the package.
            module.__path__ = list(spec.submodule_search_locations)
        if name in _KEPT_CALLS:
            setattr(module, _KEPT_CALLS[name], _KeptCall(name, _KEPT_CALLS[name]))
        _bind(name, module)


def _real(name: str) -> types.ModuleType:
    """The module ``name``, imported now if a stand-in held its place (its deferred
    parents first, so the real module is imported into the real package)."""
    parent = name.rpartition(".")[0]
    if parent:
        _real(parent)
    module = sys.modules.get(name)
    if isinstance(module, _StandIn):
        del sys.modules[name]
        imported = importlib.import_module(name)
        _bind(name, imported)
        if name in _KEPT_CALLS:
            getattr(module, _KEPT_CALLS[name]).replay(imported)
        return imported
    return importlib.import_module(name) if module is None else module


def _bind(name: str, module: types.ModuleType) -> None:
    """Make ``module`` what ``import name`` (and its parent package's attribute) gives."""
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
