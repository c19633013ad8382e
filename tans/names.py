"""The one rule for every name a user gives: tasks, zoos, space runs, searches, evaluations.

A name becomes a folder under the storage root (``tasks/<name>/``, ``spaces/<name>/``...), a
URL segment of the service and part of S3 keys, so it must be path-, URL- and shell-safe:
letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit; at most 128 characters;
never containing ``..``. ``\\A``/``\\Z`` (not ``^``/``$``) so a trailing newline does not pass.
No ``import torch``/``ray``: configs check names before anything heavy is imported.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
NAME_RULE = "letters, digits, '.', '_', '-', starting with a letter or digit, at most 128 characters, no '..'"


def is_valid_name(name: object) -> bool:
    """True if ``name`` is a string that may name a task or a run."""
    return isinstance(name, str) and bool(NAME_RE.match(name)) and ".." not in name


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if valid, else raise ``ValueError`` naming ``what`` and the rule (one line)."""
    if not is_valid_name(name):
        raise ValueError(f"{what}: {name!r} is not a valid name ({NAME_RULE})")
    return name  # type: ignore[return-value]


def is_bare_name(ref: str) -> bool:
    """True if ``ref`` (a space or dataset reference) is a name rather than a path or a URI."""
    return not any(ch in ref for ch in "/\\:")
