"""Shared glue for job entry points: one-line errors and exit codes, resolved configs."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable

from tans.config import ConfigError
from tans.data.ingest import IngestError
from tans.data.tasks import TaskError
from tans.storage import StorageError
from tans.zoo.store import ZooError

# Mistakes a user can make end in one line on stderr and a non-zero exit, never a traceback.
USER_ERRORS = (IngestError, TaskError, StorageError, ZooError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    # Modules that pull in torch define user errors too (unknown family, unreadable checkpoint);
    # count them only once loaded, so light commands never import torch just to catch them.
    extra = []
    for module, name in (("tans.zoo.supernets", "SupernetError"), ("tans.space.encoders", "SpaceError"),
                         ("tans.space.features", "ExtractorError"), ("tans.selection.search", "SearchError"),
                         ("tans.selection.export", "ModelLoadError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            extra.append(getattr(mod, name))
    return USER_ERRORS + tuple(extra)


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and map user errors to exit codes: config 2, other input 1, ^C 130."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return int(main(argv) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


# A config override: a dotted config key, then "=". `s3://b/year=2024/` or `/data/a=b` is not one.
OVERRIDE_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*=")


def _value_options(parser: argparse.ArgumentParser | None) -> set[str]:
    """Every option string (of ``parser`` and its subcommands) that takes a value."""
    found: set[str] = set()
    todo = [parser] if parser is not None else []
    while todo:
        for action in todo.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
            elif action.option_strings and action.nargs != 0:
                found.update(action.option_strings)
    return found


def split_overrides(args: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` config overrides from the other arguments.

    Only ``<config key>=<value>`` is an override, and never the value of an option that takes one
    (``--dataset s3://b/year=2024/``, ``--name a=b``): ``parser`` says which options those are.
    """
    takes_value = _value_options(parser)
    overrides, rest = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in takes_value and i + 1 < len(args):
            rest += [arg, args[i + 1]]
            i += 2
            continue
        (overrides if OVERRIDE_RE.match(arg) else rest).append(arg)
        i += 1
    return overrides, rest


def as_override(key: str, value) -> str:
    """A flag's value as a ``key=value`` override that keeps its type: strings stay strings.

    Overrides are parsed as YAML, so ``--name on`` would become True and ``--root /a/#b`` lose
    its ``#b``; a JSON string is a YAML string, whatever it holds.
    """
    return f"{key}={json.dumps(value) if isinstance(value, str) else value}"


def drain_progress(progress, format_line) -> None:
    """Print ``format_line(msg)`` for each message a Ray queue receives, until ``None`` arrives.

    Rank 0 of a Ray Train run sends its per-epoch/evaluation metrics here, so the driver can print
    them (workers' own prints do not reach a quiet driver)."""
    while True:
        try:
            msg = progress.get(timeout=5)
        except Exception:  # Empty, or the queue actor is gone at shutdown
            continue
        if msg is None:
            return
        print(format_line(msg), flush=True)
