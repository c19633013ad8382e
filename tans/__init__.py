"""TANS on Ray: task-adaptive neural network search over a zoo of pretrained networks.

The library (this package) is plain PyTorch + pyarrow: it never imports ``ray``, nor the Ray layer
above it (``jobs/``, ``serve/``), where the Ray glue lives (``jobs.runtime``: starting Ray, Ray
Data readers). Running a search from Python is ``jobs.api.search(...)``; loading what it exported
is :func:`load_model`.
"""

__version__ = "0.1.0"


def load_model(uri: str, device: str = "cpu"):
    """Load a model exported by a search (see :func:`tans.selection.export.load_model`); imports torch lazily."""
    from tans.selection.export import load_model as _load_model

    return _load_model(uri, device=device)


def __getattr__(name: str):
    # `tans.search(...)` ran the search job from inside the library; it moved up to the Ray layer.
    if name == "search":
        raise AttributeError("tans.search moved to the Ray layer: `from jobs.api import search`")
    raise AttributeError(f"module 'tans' has no attribute {name!r}")
