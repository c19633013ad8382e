"""scikit-learn's 8x8 handwritten digits (UCI optdigits), upscaled to 32 px grey.

1,797 images; values 0..16 are scaled to 0..255 (white digit on black) and resized bicubically.
An easy source: fine for meta-training, too easy to separate models as a target. A seeded 20% of
each class is test.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from tans.data.builtin.base import SourceUnavailable
from tans.data.builtin.indexed import IndexedSource

SIZE = 32


@functools.cache
def _digits():
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    data = load_digits()
    return data.images, data.target.astype(np.int64)


class Digits(IndexedSource):
    name = "digits"
    description = "8x8 handwritten digits from scikit-learn, upscaled to 32 px"
    licence = "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits)"
    origin = "PyPI package scikit-learn (sklearn.datasets.load_digits)"
    image_size = SIZE
    channels = 1

    def check_available(self) -> None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            raise SourceUnavailable("pip install scikit-learn") from None

    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def item_labels(self) -> np.ndarray:
        return _digits()[1]

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        images = _digits()[0]
        out = []
        for i in items:
            small = Image.fromarray(np.clip(images[i] * (255 / 16), 0, 255).round().astype(np.uint8))
            out.append(np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BICUBIC)))
        return out
