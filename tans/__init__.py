"""TANS on Ray: task-adaptive neural network search over a zoo of pretrained networks.

The library (this package) is plain PyTorch + pyarrow: importing it never imports ``ray``.
Ray glue lives in ``jobs/``, ``serve/`` and :mod:`tans.runtime` (imported only by those).
"""

__version__ = "0.1.0"


def load_model(uri: str, device: str = "cpu"):
    """Load a model exported by a search (see :func:`tans.selection.export.load_model`); imports torch lazily."""
    from tans.selection.export import load_model as _load_model

    return _load_model(uri, device=device)


def search(dataset: str, *, config: str | None = None, **options):
    """Run a search (the same as ``tans search``) and return its report as a ``SearchReport``.

    ``options`` are search config keys (``max_params=3_000_000, top_k=5, epochs=3, root=...``);
    ``config`` is a search config YAML (default: configs/search/local.yaml). Starts or joins Ray.
    """
    import json

    from jobs.search import search as run_search
    from tans.job_configs import load_job_config
    from tans.selection.search import SearchReport
    from tans.storage import Storage

    overrides = [f"dataset={dataset}"] + [f"{k}={json.dumps(v)}" for k, v in options.items()]
    cfg = load_job_config("search", config, overrides)
    return SearchReport(run_search(cfg, Storage(cfg.root or None)))
