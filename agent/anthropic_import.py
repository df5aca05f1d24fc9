"""Importing the ``anthropic`` SDK at the cost of what the ``api`` engine uses.

The SDK's package ``__init__`` modules import everything they name: ``import anthropic`` (or any
of its submodules, which runs the package's ``__init__`` first) loads ~3,600 modules, ~2,000
of them the pydantic models of beta features (agents, sessions, skills, organizations), plus
aiohttp, Bedrock, Vertex and OpenTelemetry glue: ~60 MB and ~0.6 s per worker (``python -X
importtime``). The engine needs the client, the Messages resource, their types and the
exceptions.

:func:`import_anthropic` has every package of the SDK (``anthropic``, ``anthropic.types``,
``anthropic.types.beta``, …) created lazily: its ``__init__`` is not run; a name it would have
imported (``from .message import Message as Message``, read from its source) is imported at
its first use (PEP 562 ``__getattr__``), as is a submodule. Modules themselves run unchanged, so
whatever the client imports explicitly is there, and the SDK's own code paths (request
building, retries, errors, response models) are the same. Only the SDK is affected.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

SDK = "anthropic"


def reexports(source: str) -> dict[str, tuple[str | None, str]]:
    """``name -> (submodule, attribute)`` for the relative imports of a package ``__init__``:
    ``from .message import Message as Message`` gives ``Message -> ("message", "Message")``,
    ``from . import types`` gives ``types -> (None, "types")`` (a submodule). Star imports
    name nothing (their names are not reachable lazily; the engine uses none of them)."""
    names: dict[str, tuple[str | None, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                if alias.name != "*":
                    names[alias.asname or alias.name] = (node.module, alias.name)
    return names


class _LazyPackageLoader(importlib.abc.Loader):
    """Makes the package module without running its ``__init__``; names it would import load
    at first use."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module, with __path__ from the spec

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None and spec.origin is not None  # noqa: S101 - find_spec made it
        names = reexports(Path(spec.origin).read_text(encoding="utf-8"))
        package = module.__name__

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            sub, attr = names.get(name, (None, name))
            try:
                target = importlib.import_module(f"{package}.{sub or attr}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{sub or attr}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            value = getattr(target, attr) if sub else target
            setattr(module, name, value)
            return value

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


class _LazyPackages(importlib.abc.MetaPathFinder):
    """Finds the SDK's regular packages (an ``__init__.py``) and loads them lazily."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        del target
        if fullname != SDK and not fullname.startswith(SDK + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.submodule_search_locations is None or not spec.origin \
                or not spec.origin.endswith("__init__.py"):
            return None  # a plain module, or a namespace package: as usual
        spec.loader = _LAZY_LOADER
        return spec


_LAZY_LOADER = _LazyPackageLoader()
_FINDER = _LazyPackages()
_lock = threading.Lock()


def import_anthropic() -> ModuleType:
    """The ``anthropic`` package, its subpackages lazy (see the module docstring). The finder
    stays installed: a subpackage first reached later (a response type of the first call) is
    lazy too. A process that imported the SDK before keeps it as it was."""
    with _lock:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        return importlib.import_module(SDK)
