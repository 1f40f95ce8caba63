"""Lazy package exports (PEP 562): a package names what it exports and where each lives, and a submodule is imported
the first time one of its names is used, so ``import fxopt.codegen`` does not load the passes, nor ``import fxopt``
TVM."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose attribute ``name`` is ``exports[name]``'s attribute of that
    name (imported once, then cached in the package)."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | exports.keys())

    return __getattr__, __dir__
