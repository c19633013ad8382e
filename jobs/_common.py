"""Shared glue for job entry points: one-line errors and exit codes, resolved configs."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tans.config import ConfigError
from tans.ingest import IngestError
from tans.storage import StorageError
from tans.tasks import TaskError
from tans.zoo import ZooError

# Mistakes a user can make end in one line on stderr and a non-zero exit, never a traceback.
USER_ERRORS = (IngestError, TaskError, StorageError, ZooError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    # Modules that pull in torch define user errors too (unknown family, unreadable checkpoint);
    # count them only once loaded, so light commands never import torch just to catch them.
    extra = []
    for module, name in (("tans.supernets", "SupernetError"), ("tans.encoders", "SpaceError"),
                         ("tans.features", "ExtractorError"), ("tans.search_core", "SearchError"),
                         ("tans.export", "ModelLoadError")):
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


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from the other positional arguments."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    rest = [a for a in args if a not in overrides]
    return overrides, rest


def drain_progress(progress, format_line) -> None:
    """Print ``format_line(msg)`` for each message a Ray queue receives, until ``None`` arrives.

    Rank 0 of a Ray Train run sends its per-epoch/evaluation metrics here, so the driver can print
    them (workers' own prints do not reach a quiet driver)."""
    while True:
        try:
            msg = progress.get(timeout=5)
        except Exception:  # noqa: BLE001 - Empty, or the queue actor is gone at shutdown
            continue
        if msg is None:
            return
        print(format_line(msg), flush=True)
