"""The Python API over the jobs: what the ``tans`` command does, as functions that return objects.

It sits beside the job modules, not in the library, because it starts or joins Ray and runs them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tans.selection.search import SearchReport


def search(dataset: str, *, config: str | None = None, **options) -> SearchReport:
    """Run a search (the same as ``tans search``) and return its report as a ``SearchReport``.

    ``options`` are search config keys (``max_params=3_000_000, top_k=5, epochs=3, root=...``);
    ``config`` is a search config YAML (default: configs/search/local.yaml). Starts or joins Ray.
    A finished search of the same name and inputs is reused, as on the command line.
    """
    from jobs.search import search as run_search
    from tans.job_configs import load_job_config
    from tans.selection.search import SearchReport
    from tans.storage import Storage

    overrides = [f"dataset={dataset}"] + [f"{k}={json.dumps(v)}" for k, v in options.items()]
    cfg = load_job_config("search", config, overrides)
    return SearchReport(run_search(cfg, Storage(cfg.root or None)))
