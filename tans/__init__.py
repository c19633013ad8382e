"""TANS on Ray: task-adaptive neural network search over a zoo of pretrained networks.

The library (this package) is plain PyTorch + pyarrow: importing it never imports ``ray``.
Ray glue lives in ``jobs/``, ``serve/`` and :mod:`tans.runtime` (imported only by those).
"""

__version__ = "0.1.0"


def load_model(uri: str, device: str = "cpu"):
    """Load a model exported by a search (see :func:`tans.export.load_model`); imports torch lazily."""
    from tans.export import load_model as _load_model

    return _load_model(uri, device=device)
