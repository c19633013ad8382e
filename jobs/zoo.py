"""Inspect a built zoo.

    python -m jobs.zoo stats [--zoo NAME] [--json] [--root ROOT]

Without ``--zoo`` and with exactly one zoo in the root, that one. ``tans zoo ...`` runs this.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._common import run_main
from tans.storage import Storage
from tans.zoo.store import ZooError, format_stats, list_zoos, read_zoo, zoo_stats


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tans zoo", description="Inspect a built zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="rows, tasks, per-task accuracy spread, params and FLOPs ranges")
    stats.add_argument("--zoo", help="zoo name (default: the only zoo in the root)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    args = parser.parse_args(argv)
    storage = Storage(args.root)
    name = args.zoo
    if not name:
        zoos = list_zoos(storage)
        if len(zoos) != 1:
            raise ZooError(f"{len(zoos)} zoos in {storage.uri} ({', '.join(zoos) or 'none'}): pass --zoo NAME")
        name = zoos[0]
    stats_ = zoo_stats(read_zoo(storage, name))
    print(json.dumps({"zoo": name, **stats_}, indent=1) if args.json else format_stats(name, stats_))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
