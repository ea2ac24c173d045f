"""Lazy package attributes: a package names what it offers, and each is imported on first use (PEP 562)."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable


def lazy_getattr(package: str, names: dict[str, str], submodules: Iterable[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps an attribute to ``"module"`` (same name there) or
    ``"module:attr"``; ``submodules`` are subpackages reachable as attributes without importing them first.
    A resolved attribute is stored on the package, so the lookup runs once."""
    submodules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = names[name].partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
