"""The contract every built-in offline source follows.

A source is a labelled image collection that a fresh machine can install through the package
registries (Debian packages, PyPI). Its classes are split by range into tasks, TANS-style:
``<source>_<start>_<end>`` holds classes ``start .. end-1``.

Two operations, and they must agree exactly:

* :meth:`BuiltinSource.plan` is cheap (no decoding, no rendering) and says how many train and
  test images each class of a range will get. ``tans data list`` is built from it.
* :meth:`BuiltinSource.load` materialises the images of a range. Its per-class, per-split counts
  equal :meth:`plan`'s; a test checks this for one task of every source.

Both are deterministic: the train/test split and any augmentation are seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRAIN, TEST = "train", "test"


@dataclass(frozen=True)
class ClassCounts:
    """Images one class gets in each split."""

    train: int
    test: int


@dataclass
class LoadedImages:
    """Images of one task range, in memory.

    ``images[i]`` is a ``uint8`` array, ``HxW`` (grey) or ``HxWx3`` (RGB), of the source's
    ``image_size``; ``labels[i]`` is the class index *within the task* (0-based); ``splits[i]`` is
    ``"train"`` or ``"test"``.
    """

    images: list[np.ndarray]
    labels: list[int]
    splits: list[str]


class SourceUnavailable(RuntimeError):
    """The data a source reads is not installed; the message says what to install."""


class BuiltinSource:
    """Base class: subclasses set the attributes and implement the four methods."""

    name: str = ""  # short, lowercase, no underscores (task names split on "_")
    description: str = ""
    licence: str = ""  # licence of the underlying data, recorded in task.json
    origin: str = ""  # where the data comes from, e.g. "Debian package dataset-fashion-mnist"
    image_size: int = 32  # native square size of the arrays load() returns
    channels: int = 1  # 1 (grey) or 3 (RGB)

    def check_available(self) -> None:
        """Raise :class:`SourceUnavailable` (saying what to install) if the data is missing."""
        raise NotImplementedError

    def class_names(self) -> list[str]:
        """All classes of the source, in a fixed order (the order task ranges index)."""
        raise NotImplementedError

    def plan(self, start: int, end: int) -> list[ClassCounts]:
        """Train/test counts for classes ``start..end-1``, without loading any image."""
        raise NotImplementedError

    def load(self, start: int, end: int) -> LoadedImages:
        """Materialise classes ``start..end-1``; labels are ``class_index - start``."""
        raise NotImplementedError

    def task_ranges(self) -> list[tuple[int, int]]:
        """End-exclusive class ranges, one per task (see :func:`split_class_ranges`)."""
        return split_class_ranges(len(self.class_names()))


def split_class_ranges(n_classes: int, target: int = 10) -> list[tuple[int, int]]:
    """Split ``n_classes`` into contiguous tasks of about ``target`` classes (5 to 20 each).

    Every source gives at least two tasks, so a 10-class source yields ``0_5`` and ``5_10``.
    """
    if n_classes < 10:
        raise ValueError(f"a built-in source needs at least 10 classes, got {n_classes}")
    n_tasks = max(2, round(n_classes / target))
    bounds = [round(i * n_classes / n_tasks) for i in range(n_tasks + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    assert all(5 <= b - a <= 20 for a, b in ranges), ranges
    return ranges


def seeded_test_mask(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask choosing ``ceil(test_fraction * n)`` of ``n`` items for test, seeded."""
    n_test = min(n - 1, max(1, math.ceil(test_fraction * n))) if n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[:n_test]] = True
    return mask
