"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

Ten clothing classes, 28 px grey (white garment on black). Harder than digits, so a useful
meta-training source. Its own train/test split is kept (so the test images are the benchmark's
test images), capped at a seeded 1,000 train and 200 test images per class to keep tasks CPU-sized.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from tans.data.builtin.base import SourceUnavailable
from tans.data.builtin.indexed import TEST_CODE, TRAIN_CODE, IndexedSource

ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
CAP = {"train": 1000, "test": 200}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian dims after a 4-byte magic) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class Fashion(IndexedSource):
    name = "fashion"
    description = "Fashion-MNIST clothing images (Zalando), own split capped at 1000/200 per class"
    licence = "MIT (Zalando SE)"
    origin = "Debian package dataset-fashion-mnist"
    image_size = 28
    channels = 1

    def check_available(self) -> None:
        missing = [f for pair in FILES.values() for f in pair if not os.path.exists(os.path.join(ROOT, f))]
        if missing:
            raise SourceUnavailable(f"missing {', '.join(missing)} in {ROOT}: apt-get install dataset-fashion-mnist")

    def class_names(self) -> list[str]:
        return list(CLASSES)

    @functools.cache  # noqa: B019 - sources live as long as the process
    def item_labels(self) -> np.ndarray:
        # Items are the train images, then the test images.
        return np.concatenate([read_idx(os.path.join(ROOT, FILES[s][1])) for s in ("train", "test")])

    @functools.cache  # noqa: B019 - sources live as long as the process
    def assignment(self) -> np.ndarray:
        labels = self.item_labels()
        n_train = len(labels) - len(read_idx(os.path.join(ROOT, FILES["test"][1])))
        original = np.where(np.arange(len(labels)) < n_train, TRAIN_CODE, TEST_CODE)
        codes = np.zeros(len(labels), dtype=np.int8)
        for c in range(len(CLASSES)):
            for split, code in (("train", TRAIN_CODE), ("test", TEST_CODE)):
                items = np.flatnonzero((labels == c) & (original == code))
                rng = np.random.default_rng(self.seed(c, split))
                codes[rng.choice(items, min(CAP[split], len(items)), replace=False)] = code
        return codes

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        images = np.concatenate([read_idx(os.path.join(ROOT, FILES[s][0])) for s in ("train", "test")])
        return list(images[items])
