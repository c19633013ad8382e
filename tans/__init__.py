"""TANS on Ray: task-adaptive neural network search over a zoo of pretrained networks.

The library (this package) is plain PyTorch + pyarrow: importing it never imports ``ray``.
Ray glue lives in ``jobs/``, ``serve/`` and :mod:`tans.runtime` (imported only by those).
"""

__version__ = "0.1.0"
