"""Turn an ImageFolder directory (local or ``s3://``) into a task in the storage root.

``SRC/<class>/<image>``: classes are the sub-directories, in sorted order. Every image is decoded,
converted to RGB (or kept grey when *every* image of the dataset is grey), resized so its shorter
side is ``image_size`` and centre-cropped to a square, and re-encoded as PNG. Files that do not
decode, or whose header declares more pixels than the bound (50 M by default, tans.data.image_limits),
are skipped and counted; a class left with no image is an error. The train/test split
is stratified per class and seeded.

All checks run before anything is written, so a bad input leaves nothing under
``tasks/<NAME>/``. Decoding is a pure function of bytes (:func:`decode_image_bytes`), so the job
layer can fan it out over Ray Data for large inputs (see :mod:`jobs.runtime`).
"""

from __future__ import annotations

import io
import posixpath
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from tans.data.builtin.base import seeded_test_mask
from tans.data.tasks import TaskError, TaskInfo, check_task_name, encode_png, task_exists, write_task
from tans.storage import Storage, StorageError, resolve_filesystem

DEFAULT_MAX_SIZE = 64  # default image size cap for ImageFolder inputs (CPU-sized zoo stages)


class IngestError(ValueError):
    """A dataset that cannot be ingested as asked (one-line message saying what to fix)."""


@dataclass
class DecodedImage:
    """One decoded image: PNG bytes (RGB and, if the image is grey, grey); ``None`` if unreadable."""

    rgb: bytes | None
    grey: bytes | None = None


@dataclass
class IngestReport:
    """What an ingest did: the task written, skipped files per class, time, engine."""

    info: TaskInfo
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    engine: str = "local"
    skipped_files: list[str] = field(default_factory=list)  # the unreadable files, in listing order

    def skipped_note(self, verb: str = "skipped", shown: int = 3) -> str:
        """``, skipped N unreadable file(s): a, b, c and M more`` (empty when none): what was left out."""
        files = self.skipped_files
        count = sum(self.skipped.values()) or len(files)
        if not count:
            return ""
        more = f" and {len(files) - shown} more" if len(files) > shown else ""
        names = f": {', '.join(files[:shown])}{more}" if files else ""
        return f", {verb} {count} unreadable file(s){names}"

    def summary(self) -> str:
        c = self.info.counts
        extra = self.skipped_note()
        return (
            f"task {self.info.name}: {self.info.num_classes} classes, {c['train']} train / {c['test']} test images, "
            f"{self.info.image_size}px x{self.info.channels}{extra} ({self.seconds:.1f}s, {self.engine})"
        )


@dataclass
class ImageFolderListing:
    """The files of an ImageFolder: one list of paths per class (sorted)."""

    uri: str
    fs: pafs.FileSystem
    classes: list[str]
    files: list[list[str]]

    @property
    def num_files(self) -> int:
        return sum(len(f) for f in self.files)


def open_source(src: str, missing: str = "no such directory") -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """``(filesystem, path, info)`` of a local or ``s3://`` source; :class:`IngestError` if absent."""
    try:
        fs, base = resolve_filesystem(src)
        info = fs.get_file_info(base)
    except (StorageError, OSError) as exc:
        raise IngestError(f"{src}: cannot open ({' '.join(str(exc).split())[:160]})") from None
    if info.type == pafs.FileType.NotFound:
        raise IngestError(f"{src}: {missing}")
    return fs, base, info


def list_imagefolder(src: str) -> ImageFolderListing:
    """List ``src/<class>/<file>``; raise :class:`IngestError` if it is missing or unusable."""
    fs, base, info = open_source(src)
    if info.type != pafs.FileType.Directory:
        raise IngestError(f"{src}: not a directory (expected an ImageFolder: SRC/<class>/<image>)")
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    by_class: dict[str, list[str]] = {}
    for entry in entries:
        rel = posixpath.relpath(entry.path, base)
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue  # hidden files and directories (.DS_Store, .git) are not data
        if entry.type == pafs.FileType.Directory and len(parts) == 1:
            by_class.setdefault(parts[0], [])
        elif entry.type == pafs.FileType.File and len(parts) >= 2:
            by_class.setdefault(parts[0], []).append(entry.path)
    if not by_class:
        raise IngestError(f"{src}: empty (expected one sub-directory per class: SRC/<class>/<image>)")
    classes = sorted(by_class)
    empty = [c for c in classes if not by_class[c]]
    if empty:
        raise IngestError(f"{src}: class '{empty[0]}' has no files")
    if len(classes) < 2:
        raise IngestError(f"{src}: found {len(classes)} class ('{classes[0]}'); a classification task needs at least 2")
    return ImageFolderListing(src, fs, classes, [sorted(by_class[c]) for c in classes])


def decode_image_bytes(data: bytes, image_size: int) -> DecodedImage:
    """Decode any PIL-readable image, resize (shorter side) + centre-crop to a square, re-encode.

    Returns ``DecodedImage(None)`` for a file that is not a readable image, or whose header
    declares more pixels than the bound (tans.data.image_limits): it is skipped before decoding.
    """
    from tans.data.image_limits import open_bounded

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; the pixels are what matter
            img = open_bounded(data)  # ImageTooLarge before a single pixel is decoded
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            img = img.convert("RGB")
    except Exception:  # PIL raises many types for broken files; all mean "skip"
        return DecodedImage(None)
    w, h = img.size
    if w < 1 or h < 1:
        return DecodedImage(None)
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    arr = np.asarray(img.crop((left, top, left + image_size, top + image_size)))
    grey = None
    if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 1], arr[:, :, 2]):
        grey = encode_png(arr[:, :, 0])
    return DecodedImage(encode_png(arr), grey)


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def first_image_size(listing: ImageFolderListing, cap: int = DEFAULT_MAX_SIZE) -> int:
    """Default image size: the first readable image's shorter side, capped at ``cap``."""
    for files in listing.files:
        for path in files:
            try:
                with Image.open(io.BytesIO(read_file(listing.fs, path))) as img:
                    return max(8, min(cap, min(img.size)))
            except Exception:
                continue
    return cap


DecodeMany = Callable[[pafs.FileSystem, Sequence[str], int], list[DecodedImage]]


def decode_in_process(fs: pafs.FileSystem, paths: Sequence[str], image_size: int) -> list[DecodedImage]:
    """Read and decode ``paths`` one by one in this process, with a progress bar."""
    from tqdm import tqdm

    return [
        decode_image_bytes(read_file(fs, p), image_size)
        for p in tqdm(paths, desc="decoding", unit="img", leave=False, disable=None)
    ]


def ingest_imagefolder(
    storage: Storage,
    src: str,
    name: str,
    image_size: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    part_rows: int = 5000,
    decode_many: DecodeMany | None = None,
    engine: str = "local",
    config: dict | None = None,
) -> IngestReport:
    """Ingest ImageFolder ``src`` as task ``name``; returns an :class:`IngestReport`.

    ``image_size`` 0 means the first image's shorter side, capped at 64 px. ``decode_many`` lets
    the job layer decode on Ray; it must return one :class:`DecodedImage` per path, in order.
    """
    t0 = time.perf_counter()
    check_task_name(name)
    if not 0.0 < test_fraction < 1.0:
        raise IngestError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if task_exists(storage, name) and not force:
        raise IngestError(f"task {name!r} already exists in {storage.uri} (use --force to replace it)")
    listing = list_imagefolder(src)
    size = image_size or first_image_size(listing)
    paths = [p for files in listing.files for p in files]
    labels = np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(listing.files)])
    decoded = (decode_many or decode_in_process)(listing.fs, paths, size)
    if len(decoded) != len(paths):
        raise IngestError(f"{src}: decoder returned {len(decoded)} results for {len(paths)} files")
    ok = np.array([d.rgb is not None for d in decoded])
    skipped = {c: int((~ok[labels == i]).sum()) for i, c in enumerate(listing.classes)}
    for i, c in enumerate(listing.classes):
        n_ok = int(ok[labels == i].sum())
        if n_ok == 0:
            raise IngestError(f"{src}: class '{c}' has no readable image ({skipped[c]} file(s) could not be decoded)")
    all_grey = all(d.grey is not None for d in decoded if d.rgb is not None)
    images: dict[str, list[bytes]] = {"train": [], "test": []}
    split_labels: dict[str, list[int]] = {"train": [], "test": []}
    for i in range(len(listing.classes)):
        idx = np.flatnonzero((labels == i) & ok)
        test_mask = seeded_test_mask(len(idx), test_fraction, seed * 7919 + i)
        for j, is_test in zip(idx, test_mask):
            split = "test" if is_test else "train"
            png = decoded[j].grey if all_grey else decoded[j].rgb
            if png is None:  # cannot happen: `ok` and `all_grey` checked it
                raise IngestError(f"{paths[j]}: decoded without {'grey' if all_grey else 'RGB'} PNG bytes")
            images[split].append(png)
            split_labels[split].append(i)
    info = TaskInfo(
        name=name,
        classes=list(listing.classes),
        source=src,
        licence="unknown (user-provided ImageFolder)",
        image_size=size,
        channels=1 if all_grey else 3,
        counts={},
        config=dict(config or {}),
    )
    try:
        info = write_task(storage, info, images, split_labels, part_rows=part_rows, force=force)
    except TaskError as exc:
        raise IngestError(str(exc)) from None
    unreadable = [str(p) for p, good in zip(paths, ok) if not good]
    return IngestReport(info, skipped, time.perf_counter() - t0, engine, unreadable)
