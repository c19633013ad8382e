"""The built-in offline sources, by name.

Importing this module loads nothing (no data, no torch, no ray); :func:`all_sources` imports the
source modules and constructs the sources, which themselves read data only when asked.
"""

from __future__ import annotations

import functools
import importlib

from tans.builtin.base import BuiltinSource

# module, class names
_MODULES = {
    "tans.builtin.animals": ("Animals",),
    "tans.builtin.clipart": ("Clipart",),
    "tans.builtin.digits": ("Digits",),
    "tans.builtin.fashion": ("Fashion",),
    "tans.builtin.fonts": ("Arabic", "Cjk", "Cyrillic", "Devanagari", "Greek", "Hangul", "Hebrew",
                           "Latin", "Thai"),
    "tans.builtin.mnist": ("Mnist",),
}


@functools.lru_cache(maxsize=None)
def _sources() -> tuple[BuiltinSource, ...]:
    sources = [getattr(importlib.import_module(module), cls)()
               for module, classes in _MODULES.items() for cls in classes]
    return tuple(sorted(sources, key=lambda s: s.name))


def all_sources() -> dict[str, BuiltinSource]:
    """Every built-in source, ordered by name (the same instances on every call, so the
    per-instance caches of metadata survive)."""
    return {s.name: s for s in _sources()}
