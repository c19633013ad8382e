"""Animal silhouettes ("Animal-MNIST") from the PyPI package ``animal-mnist``.

10,000 images, 28 px grey, ten animals (1,000 each): white silhouette on black, in MNIST's format.
Shapes rather than strokes, so a different kind of task from digits and letters. The package's
code needs TensorFlow, so it is installed with ``--no-deps`` and only its two data files are read
(gzipped pickles of numpy arrays, unpickled with a loader that accepts nothing but numpy arrays).
A seeded 20% of each class is test.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

from tans.data.builtin.base import SourceUnavailable
from tans.data.builtin.indexed import IndexedSource

FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
# Label order as in the package description (labels 0..9 are in alphabetical order).
CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def data_dir() -> str | None:
    """``animal_mnist/data/Animal_MNIST`` without importing the package (it imports TensorFlow)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (a pickle can otherwise run arbitrary code)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, any numpy version
        return getattr(np, name)


def _load(filename: str) -> np.ndarray:
    d = data_dir()
    if d is None:
        raise SourceUnavailable("pip install --no-deps animal-mnist (see tans/data/builtin/python_requirements.txt)")
    with gzip.open(os.path.join(d, filename), "rb") as f:
        return np.asarray(_ArrayUnpickler(f).load())


@functools.cache
def _labels() -> np.ndarray:
    return _load(FILES[1]).astype(np.int64)


@functools.cache
def _images() -> np.ndarray:
    return _load(FILES[0]).astype(np.uint8)


class Animals(IndexedSource):
    name = "animals"
    description = "Animal silhouettes in MNIST format (Animal-MNIST), 10 animals"
    licence = "MIT (animal-mnist, Sina Mohammadi)"
    origin = "PyPI package animal-mnist (data files only)"
    image_size = 28
    channels = 1

    def check_available(self) -> None:
        d = data_dir()
        if d is None or not all(os.path.exists(os.path.join(d, f)) for f in FILES):
            raise SourceUnavailable(
                "pip install --no-deps animal-mnist (see tans/data/builtin/python_requirements.txt)")

    def class_names(self) -> list[str]:
        return list(CLASSES)

    def item_labels(self) -> np.ndarray:
        return _labels()

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        return list(_images()[items])
