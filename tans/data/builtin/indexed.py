"""Shared machinery for sources whose images are numbered items with known labels.

A subclass says, cheaply, which class every item belongs to (:meth:`IndexedSource.item_labels`,
e.g. a label array or a directory listing) and how to decode a set of items
(:meth:`IndexedSource.decode`). The seeded choice of which items are train, test or unused is
made here from the labels alone, so :meth:`plan` never decodes an image and :meth:`load`
decodes exactly the items :meth:`plan` counted.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from tans.data.builtin.base import TEST, TRAIN, BuiltinSource, ClassCounts, LoadedImages, seeded_test_mask

UNUSED, TRAIN_CODE, TEST_CODE = 0, 1, 2


class IndexedSource(BuiltinSource):
    """Items ``0..n-1`` with labels; a seeded per-class test split of ``test_fraction``.

    ``max_per_class`` (if set) first keeps a seeded choice of that many items of each class, so
    big classes stay CPU-sized. Subclasses with their own train/test split override
    :meth:`assignment`.
    """

    test_fraction: float = 0.2
    max_per_class: int | None = None

    def item_labels(self) -> np.ndarray:
        """Class index (into :meth:`class_names`) of every item; cheap, cached by the subclass."""
        raise NotImplementedError

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        """The images of ``items`` (item numbers), in that order."""
        raise NotImplementedError

    def seed(self, *parts: object) -> int:
        """A fixed seed that depends on the source name and ``parts``."""
        return zlib.crc32(":".join(map(str, (self.name, *parts))).encode())

    @functools.cache  # noqa: B019 - sources live as long as the process
    def assignment(self) -> np.ndarray:
        """Per item: 0 unused, 1 train, 2 test."""
        labels = self.item_labels()
        codes = np.zeros(len(labels), dtype=np.int8)
        for c in range(len(self.class_names())):
            items = np.flatnonzero(labels == c)
            if self.max_per_class is not None and len(items) > self.max_per_class:
                rng = np.random.default_rng(self.seed(c, "keep"))
                items = np.sort(rng.choice(items, self.max_per_class, replace=False))
            test = seeded_test_mask(len(items), self.test_fraction, self.seed(c, "test"))
            codes[items] = np.where(test, TEST_CODE, TRAIN_CODE)
        return codes

    def plan(self, start: int, end: int) -> list[ClassCounts]:
        self._check_range(start, end)
        labels, codes = self.item_labels(), self.assignment()
        return [ClassCounts(train=int(np.sum((labels == c) & (codes == TRAIN_CODE))),
                            test=int(np.sum((labels == c) & (codes == TEST_CODE))))
                for c in range(start, end)]

    def load(self, start: int, end: int) -> LoadedImages:
        self._check_range(start, end)
        labels, codes = self.item_labels(), self.assignment()
        items = np.flatnonzero((labels >= start) & (labels < end) & (codes != UNUSED))
        items = items[np.argsort(labels[items], kind="stable")]  # class by class, item order within
        images = self.decode(items)
        return LoadedImages(images=[np.ascontiguousarray(im, dtype=np.uint8) for im in images],
                            labels=[int(labels[i]) - start for i in items],
                            splits=[TEST if codes[i] == TEST_CODE else TRAIN for i in items])

    def _check_range(self, start: int, end: int) -> None:
        n = len(self.class_names())
        if not 0 <= start < end <= n:
            raise ValueError(f"{self.name}: class range {start}..{end} outside 0..{n}")
