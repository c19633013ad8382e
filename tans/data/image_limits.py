"""The pixel bound every decoder of untrusted images applies before it decodes a single pixel.

A small file can declare a huge image (a "decompression bomb": a 1 MB PNG of 30,000 x 30,000
solid pixels decodes to 2.7 GB). Ingest and ``tans predict`` open each file, read its header
(width x height) and skip the file - counted with the unreadable ones - when it declares more than
``max_image_pixels()`` pixels: 50 M by default (e.g. 8,660 x 5,773; larger than any camera image a
classification dataset holds), or ``$TANS_MAX_IMAGE_PIXELS``. The HTTP service has its own,
stricter per-image and per-request budgets (serve/args.py).
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
ENV = "TANS_MAX_IMAGE_PIXELS"


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the bound."""


def max_image_pixels() -> int:
    """The bound in pixels: ``$TANS_MAX_IMAGE_PIXELS`` if set (a positive int), else 50 M."""
    text = os.environ.get(ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"${ENV}={text!r}: expected a positive number of pixels") from None
        if value > 0:
            return value
        raise ValueError(f"${ENV}={text!r}: expected a positive number of pixels")
    return DEFAULT_MAX_IMAGE_PIXELS


def open_bounded(data: bytes, limit: int | None = None) -> Image.Image:
    """``Image.open`` (header only) that raises :class:`ImageTooLarge` above the bound.

    The caller decodes (``load``/``convert``) only after this returned. PIL's own bomb check
    (a warning, then an error at twice its limit) is superseded by this explicit, lower one.
    """
    limit = max_image_pixels() if limit is None else limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # PIL's own limit, met while reading the header
            raise ImageTooLarge(f"{exc} (bound {limit:,} pixels, ${ENV})") from None
    w, h = img.size
    if w * h > limit:
        img.close()
        raise ImageTooLarge(f"{w} x {h} = {w * h:,} pixels is over the bound of {limit:,} (${ENV})")
    return img
