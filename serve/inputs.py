"""What a client may send, and turning it into images and labels (or a clear 4xx).

Everything here runs in the ingress, before any model is touched, and is plain Python (no Ray),
so each rule is unit-testable. Three ways to send a query:

* JSON: ``images`` (base64 PNG/JPEG strings, ``data:`` URLs accepted) + ``labels``;
* ``multipart/form-data``: ``images`` file parts (``files`` also accepted) + ``labels``
  (repeated fields, ``0,1,1`` or ``[0,1,1]``) + the same scalar fields as form fields;
* ``dataset``: a task in the service's storage root (its name, ``tasks/<name>`` or
  ``<root>/tasks/<name>``), sampled ``per_class`` images per class with ``seed``.

Images are decoded in two passes, so a small body cannot become gigabytes of pixels:

1. :func:`check_image_headers` opens every image with PIL (PNG and JPEG parsers only), which
   reads the header and no pixel data, and refuses the request (413) when one image has a side
   above ``max_image_side`` or more than ``max_image_pixels`` pixels, or when the sum of
   width x height over the request exceeds ``max_pixels_per_request`` (the decoded-pixel budget,
   default 64 M). 2,000 solid-colour 1024x1024 PNGs (an 11 MB body, 6 GiB decoded) stop here.
2. :func:`decode_resized` then decodes the images one by one, each converted to RGB (grey
   repeated, alpha dropped, palette expanded) and at once resized to the extractor's input size
   (:func:`resize_uint8`: the bilinear, antialiased, rounded resize the Encoder applied before,
   so the results are the same as before, and images already at that size are untouched).
   Decoded memory is then ``n_images x 3 x size^2`` bytes plus one image being decoded.

Both passes run in a worker thread (the ingress awaits them), never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.multipart import split_form_data

LABEL_MAX = 2**31 - 1
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class RetrieveRequest(BaseModel):
    """The body of ``POST /v1/retrieve`` (JSON), or its form fields (multipart)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[str] | None = Field(None, description="base64-encoded PNG or JPEG images (data: URLs accepted)")
    labels: list[Annotated[int, Field(ge=0, le=LABEL_MAX)]] | None = Field(
        None, description="one class label per image; at least 2 distinct classes")
    dataset: str | None = Field(None, description="instead of images: a task in the storage root "
                                                  "(name, tasks/<name> or <root>/tasks/<name>)")
    split: Literal["train", "test"] = Field("train", description="dataset split to sample")
    per_class: int | None = Field(None, ge=1, description="dataset images per class (default: the service's)")
    seed: int = Field(0, ge=0, description="dataset sampling seed")
    k: int = Field(10, ge=1, description="how many models to return (at most the service's max_k)")
    max_params: int | None = Field(None, ge=0, description="only models with at most this many parameters")
    max_flops: int | None = Field(None, ge=0, description="only models with at most this many FLOPs")
    family: str | None = Field(None, description="only models of this supernet family")
    rerank: bool = Field(True, description="re-rank the top-k by the predicted accuracy (space-alone ranking only)")
    prior_weight: float | None = Field(None, ge=0, le=100, description=(
        "weight of the nearest-dataset prior: rank by z(predicted accuracy) + prior_weight * z(nearest-dataset "
        "score), as `tans search` does; 0 = the space alone (cosine top-k, re-ranked); default: the service's"))


class CandidateOut(BaseModel):
    model_id: str
    task: str
    similarity: float
    predicted_accuracy: float
    n_params: int
    flops: int


class RetrieveResponse(BaseModel):
    space_run: str = Field(description="the space run that answered (encoder and index alike)")
    space_uri: str
    candidates: list[CandidateOut]
    requested_k: int
    returned_k: int
    note: str
    constraints: dict
    prior_weight: float = Field(0.0, description=(
        "the weight the nearest-dataset prior was blended with; 0 when the ranking is the space's alone "
        "(asked for, or no zoo task has a stored query)"))
    n_images: int
    n_classes: int
    resized: int = Field(description="images resized to the extractor's image size")


class ErrorBody(BaseModel):
    error: str


def validation_message(exc: ValidationError) -> str:
    """One line naming each bad field (at most 5)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_json_request(body: bytes) -> RetrieveRequest:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        return RetrieveRequest.model_validate(obj)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def parse_multipart_request(body: bytes, content_type: str) -> tuple[RetrieveRequest, list[bytes]]:
    """(the request's fields, the raw bytes of each image part) of a ``multipart/form-data`` body."""
    try:
        parts = split_form_data(body, content_type)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    fields: dict[str, list[str]] = {}
    files: list[bytes] = []
    for name, payload in parts:
        if name in ("images", "files"):
            files.append(payload)
        elif name:
            try:
                fields.setdefault(name, []).append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise ApiError(400, f"form field {name!r} is not UTF-8 text") from None
    data: dict = {}
    for name, values in fields.items():
        if name == "labels":
            data["labels"] = _form_labels(values)
        elif len(values) > 1:
            raise ApiError(400, f"form field {name!r} is given {len(values)} times")
        elif name in ("k", "per_class", "seed", "max_params", "max_flops"):
            data[name] = _form_int(name, values[0])
        elif name == "prior_weight":
            data[name] = _form_float(name, values[0])
        elif name == "rerank":
            data[name] = values[0].strip().lower() in ("1", "true", "yes", "on")
        else:
            data[name] = values[0]
    try:
        return RetrieveRequest.model_validate(data), files
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def _form_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ApiError(400, f"{name}: {text!r} is not an integer") from None


def _form_float(name: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ApiError(400, f"{name}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, f"{name}: {text!r} is not a finite number")
    return value


def _form_labels(values: list[str]) -> list[int]:
    if len(values) == 1:
        text = values[0].strip()
        items = json.loads(text) if text.startswith("[") and _is_json(text) else text.split(",")
    else:
        items = values
    try:
        return [int(str(v).strip()) for v in items]
    except ValueError:
        raise ApiError(400, "labels: expected integers (repeated fields, '0,1,1' or '[0,1,1]')") from None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def decode_base64(text: str, index: int) -> bytes:
    text = DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"images[{index}] is not valid base64") from None


# Formats a client may send; PIL tries only these parsers, never its dozens of others.
FORMATS = ("PNG", "JPEG")
_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"\0\0\1\0", "ICO"),
          (b"8BPS", "PSD"), (b"\0\0\0\x0cjP  ", "JPEG 2000"))


@dataclass(frozen=True)
class ImageLimits:
    """The per-image and per-request pixel bounds (AppArgs' fields of the same names)."""

    max_image_side: int = 1024
    max_image_pixels: int = 1024 * 1024
    max_pixels_per_request: int = 64_000_000


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _open_checked(data: bytes, index: int, max_side: int, max_pixels: int | None):
    """The PIL image of ``data`` with only its header read, after the format and size checks."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        other = _sniff(data)
        if other:
            raise ApiError(400, f"images[{index}] is a {other} image; send PNG or JPEG") from None
        raise ApiError(400, f"images[{index}] is not a PNG or JPEG image") from None
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"images[{index}] is too large to decode ({str(exc).splitlines()[0][:120]})") from None
    except ValueError as exc:
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        if "too large" in text.lower() or "too much memory" in text.lower():  # PNG text/ICC chunks over PIL's limits
            raise ApiError(413, f"images[{index}] holds too much metadata ({text})") from None
        raise ApiError(400, f"images[{index}] is truncated or corrupt ({text})") from None
    except (OSError, SyntaxError) as exc:
        raise ApiError(400, f"images[{index}] is truncated or corrupt ({str(exc).splitlines()[0][:120]})") from None
    try:
        if img.format not in FORMATS:  # e.g. MPO, which the JPEG parser may hand back
            raise ApiError(400, f"images[{index}] is a {img.format} image; send PNG or JPEG")
        w, h = img.size
        if max(w, h) > max_side:
            raise ApiError(413, f"images[{index}] is {w}x{h} px; the limit is {max_side} px a side")
        if max_pixels is not None and w * h > max_pixels:
            raise ApiError(413, f"images[{index}] is {w}x{h} = {w * h:,} px; the limit is {max_pixels:,} px "
                                "an image (max_image_pixels)")
    except ApiError:
        img.close()
        raise
    return img


def image_bytes(item: bytes | str, index: int) -> bytes:
    """The raw bytes of one image as sent: a multipart part, or a base64 string of a JSON body."""
    return item if isinstance(item, bytes) else decode_base64(item, index)


def check_image_headers(raw: Sequence[bytes | str], limits: ImageLimits,
                        cancelled: threading.Event | None = None) -> list[bytes]:
    """Every image's bytes, after checking format, sizes and the request's pixel budget from headers only.

    No pixel is decoded here: PIL's ``Image.open`` parses the header (PNG: up to the first data
    chunk; JPEG: up to the frame header) and leaves the pixels for ``load()``. 400 for a bad
    image, 413 for an image or a request over its bound (the message names the bound).
    """
    datas, total = [], 0
    for i, item in enumerate(raw):
        _check_cancelled(cancelled)
        data = image_bytes(item, i)
        with _open_checked(data, i, limits.max_image_side, limits.max_image_pixels) as img:
            w, h = img.size
        total += w * h
        datas.append(data)
    if total > limits.max_pixels_per_request:
        raise ApiError(413, f"the {len(datas)} images hold {total:,} pixels when decoded; the limit is "
                            f"{limits.max_pixels_per_request:,} pixels per request (max_pixels_per_request)")
    return datas


def decode_image(data: bytes, index: int, max_side: int, max_pixels: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 ``3 x H x W`` RGB; 400 for a non-image or a truncated one, 413 if too large.

    The side (``max_side``) and pixel (``max_pixels``) bounds are checked from the header, before
    the pixels are decoded.
    """
    from PIL import Image

    img = _open_checked(data, index, max_side, max_pixels)
    try:
        with img:
            img.load()  # decodes now: a truncated file fails here, not later
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"images[{index}] is too large to decode ({str(exc).splitlines()[0][:120]})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, f"images[{index}] is truncated or corrupt ({str(exc).splitlines()[0][:120]})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ApiError(400, f"images[{index}] has an unusable shape {rgb.shape}")
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def resize_uint8(x, size: int):
    """uint8 ``N x 3 x H x W`` tensor -> ``N x 3 x size x size``: bilinear, antialiased, rounded.

    The library extractor's own resize (tans/space/features.py), rounded back to uint8; the Encoder
    applies the same one to images that still differ from its space's size.
    """
    import torch
    import torch.nn.functional as F

    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def decode_resized(datas: Sequence[bytes], size: int, limits: ImageLimits,
                   cancelled: threading.Event | None = None) -> tuple[np.ndarray, int]:
    """(uint8 ``N x 3 x size x size``, how many images were resized): each image decoded, then resized at once.

    Only one full-size image exists at a time, so memory is the output plus one upload's pixels.
    ``cancelled`` (set when the request timed out) stops the work between two images.
    """
    import torch

    out = np.empty((len(datas), 3, size, size), dtype=np.uint8)
    resized = 0
    for i, data in enumerate(datas):
        _check_cancelled(cancelled)
        im = decode_image(data, i, limits.max_image_side, limits.max_image_pixels)
        if im.shape[1:] != (size, size):
            im = resize_uint8(torch.from_numpy(im)[None], size)[0].numpy()
            resized += 1
        out[i] = im
    return out, resized


def _check_cancelled(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise ApiError(504, "the request timed out while its images were being decoded")


@dataclass
class Query:
    """Decoded images (a list of uint8 ``3 x H x W`` arrays, or one ``N x 3 x H x W`` array) and labels."""

    images: list[np.ndarray] | np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def stack_if_uniform(images: list[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    """One ``N x 3 x H x W`` array when all images share a size (cheaper to ship), else the list."""
    if images and len({im.shape for im in images}) == 1:
        return np.stack(images)
    return images


def check_labels(labels: list[int] | None, n_images: int) -> np.ndarray:
    if labels is None:
        raise ApiError(400, "labels: required with images (one class label per image)")
    if len(labels) != n_images:
        raise ApiError(400, f"{n_images} images but {len(labels)} labels")
    arr = np.asarray(labels, dtype=np.int64)
    n_classes = len(np.unique(arr))
    if n_classes < 2:
        raise ApiError(400, f"a query needs at least 2 classes, got {n_classes}")
    return arr


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ApiError(400, "images: at least 2 images of 2 classes are needed")
    if n > max_images:
        raise ApiError(413, f"{n} images; the limit is {max_images} per request")


def task_name_of(dataset: str, root_uri: str) -> str:
    """The task name a ``dataset`` field names; 400 for anything that is not a task in the root.

    Accepted: ``<name>``, ``tasks/<name>``, ``<root>/tasks/<name>``. A name is letters, digits,
    ``_``, ``-``, ``.`` starting with a letter or digit, so no form can leave the storage root.
    """
    from tans.data.tasks import TASK_NAME_RE
    from tans.paths import TASKS

    text = dataset.strip().rstrip("/")
    for prefix in (f"{root_uri.rstrip('/')}/{TASKS}/", f"{TASKS}/"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if not TASK_NAME_RE.match(text):
        raise ApiError(400, f"dataset {dataset!r} is not a task name of this service's storage root "
                            "(use <name>, tasks/<name> or <root>/tasks/<name>)")
    return text


def dataset_query(storage, dataset: str, split: str, per_class: int, seed: int, max_images: int,
                  max_side: int, max_pixels: int | None = None) -> Query:
    """A seeded sample of ``per_class`` images per class of a stored task (404 if there is none).

    A task stores one image size, so the decoded-pixel budget (``max_pixels``) is checked from the
    sample's size before any image is decoded (413).
    """
    import pyarrow as pa

    from tans.data.reader import decode_images
    from tans.data.tasks import TaskError, read_split, read_task_info, task_exists
    from tans.space.features import sample_per_class

    name = task_name_of(dataset, storage.uri)
    if not task_exists(storage, name):
        raise ApiError(404, f"dataset {name!r} is not a task in the storage root")
    try:
        info = read_task_info(storage, name)
        table = read_split(storage, name, split)
    except TaskError as exc:
        raise ApiError(404, str(exc)) from None
    if info.image_size > max_side:
        raise ApiError(413, f"dataset {name!r} has {info.image_size} px images; the limit is {max_side} px")
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    rows = sample_per_class(labels, per_class, seed)
    check_count(len(rows), max_images)
    if max_pixels is not None and len(rows) * info.image_size**2 > max_pixels:
        raise ApiError(413, f"dataset {name!r}: {len(rows)} images of {info.image_size}x{info.image_size} px hold "
                            f"{len(rows) * info.image_size**2:,} pixels; the limit is {max_pixels:,} pixels per "
                            "request (max_pixels_per_request)")
    pngs = table.column("image").take(pa.array(rows)).to_pylist()
    images = decode_images(pngs, info.image_size, channels=3).numpy()
    return Query(images=images, labels=labels[rows])
