"""Lazy re-exports (PEP 562), so importing a package does not import every heavy dependency of its members."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def exported_names(exports: dict[str, tuple[str, ...]]) -> list[str]:
    """The sorted public names of ``exports`` (``{module path: names}``), for ``__all__``."""
    return sorted(name for names in exports.values() for name in names)


def lazy_getattr(package: str, exports: dict[str, tuple[str, ...]], namespace: dict[str, Any]
                 ) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports a name of ``exports`` (``{module path: names}``) on first access and
    caches it in ``namespace`` (the package's ``globals()``)."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in module_of:
            value = getattr(import_module(module_of[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
