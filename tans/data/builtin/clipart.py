"""Open Clip Art Library drawings from the Debian package ``openclipart-png``.

A class is a subcategory directory, ``/usr/share/openclipart/png/<category>/<subcategory>``, with
every PNG below it (subfolders included), named ``category/subcategory``; subcategories with at
least :data:`MIN_PER_CLASS` usable images are classes, in path order. Colour drawings and icons: a
different domain from the grey glyph sources, and 64 px RGB. Each image is alpha-composited on
white and fitted, aspect ratio kept, into the centre of a white square. Big classes keep a seeded
:data:`MAX_PER_CLASS`; a seeded 20% of each class is test.

Some files are not usable: a few declare enormous sizes (decompression bombs to Pillow) or are
corrupt. Which ones is decided from a cached header scan (``Image.verify`` checks the chunk CRCs
without decoding pixels; ~1 s for all ~6,500 files), used by both ``plan`` and ``load``.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
from PIL import Image

from tans.data.builtin.base import SourceUnavailable
from tans.data.builtin.indexed import IndexedSource

ROOT = "/usr/share/openclipart/png"
SIZE = 64
MIN_PER_CLASS = 40
MAX_PER_CLASS = 200
MAX_PIXELS = 4096 * 4096  # larger drawings are skipped: decoding one takes seconds and GBs


def usable(path: str) -> bool:
    """Whether a PNG opens, passes ``verify`` and is not huge (header reads only, no decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    return False
                im.verify()
        return True
    except Exception:  # any failure to read the header means "skip this file"
        return False


@functools.cache
def _catalogue() -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """(class names, usable files sorted by path, class index of each file)."""
    names: list[str] = []
    files: list[str] = []
    labels: list[int] = []
    for category in sorted(os.listdir(ROOT)):
        cat_dir = os.path.join(ROOT, category)
        if not os.path.isdir(cat_dir):
            continue
        for sub in sorted(os.listdir(cat_dir)):
            sub_dir = os.path.join(cat_dir, sub)
            if not os.path.isdir(sub_dir):
                continue
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(sub_dir) for f in fs
                           if f.lower().endswith(".png"))
            found = [f for f in found if usable(f)]
            if len(found) >= MIN_PER_CLASS:
                labels += [len(names)] * len(found)
                files += found
                names.append(f"{category}/{sub}")
    return tuple(names), tuple(files), np.asarray(labels, dtype=np.int64)


def render(path: str) -> np.ndarray:
    """One drawing: composited on white, fitted into a white ``SIZE`` square, ``SIZE x SIZE x 3``."""
    with Image.open(path) as src:
        im = src.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    white.alpha_composite(im)  # composite before resizing, so edges blend with white, not black
    rgb = white.convert("RGB")
    scale = SIZE / max(rgb.size)
    w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    rgb = rgb.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    square = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    square.paste(rgb, ((SIZE - w) // 2, (SIZE - h) // 2))
    return np.asarray(square, dtype=np.uint8)


class Clipart(IndexedSource):
    name = "clipart"
    description = "Open Clip Art drawings, class = category/subcategory, 64 px RGB"
    licence = "public domain (Creative Commons Public Domain Dedication, per the package's copyright file)"
    origin = "Debian package openclipart-png"
    image_size = SIZE
    channels = 3
    max_per_class = MAX_PER_CLASS

    def check_available(self) -> None:
        if not os.path.isdir(ROOT):
            raise SourceUnavailable(f"{ROOT} not found: apt-get install openclipart-png")
        if len(_catalogue()[0]) < 10:
            raise SourceUnavailable(f"{ROOT}: fewer than 10 subcategories with {MIN_PER_CLASS} images")

    def class_names(self) -> list[str]:
        return list(_catalogue()[0])

    def item_labels(self) -> np.ndarray:
        return _catalogue()[2]

    def decode(self, items: np.ndarray) -> list[np.ndarray]:
        files = _catalogue()[1]
        return [render(files[i]) for i in items]
