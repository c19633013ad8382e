"""The built-in offline sources, by name.

Importing this module loads nothing (no data, no torch, no ray); :func:`all_sources` imports the
source modules and constructs the sources, which themselves read data only when asked.
"""

from __future__ import annotations

import functools
import importlib

from tans.data.builtin.base import BuiltinSource

# module, class names
_MODULES = {
    "tans.data.builtin.animals": ("Animals",),
    "tans.data.builtin.clipart": ("Clipart",),
    "tans.data.builtin.digits": ("Digits",),
    "tans.data.builtin.fashion": ("Fashion",),
    "tans.data.builtin.fonts": ("Arabic", "Cjk", "Cyrillic", "Devanagari", "Greek", "Hangul", "Hebrew",
                           "Latin", "Thai"),
    "tans.data.builtin.mnist": ("Mnist",),
}


@functools.cache
def _sources() -> tuple[BuiltinSource, ...]:
    sources = [getattr(importlib.import_module(module), cls)()
               for module, classes in _MODULES.items() for cls in classes]
    return tuple(sorted(sources, key=lambda s: s.name))


def all_sources() -> dict[str, BuiltinSource]:
    """Every built-in source, ordered by name (the same instances on every call, so the
    per-instance caches of metadata survive)."""
    return {s.name: s for s in _sources()}
