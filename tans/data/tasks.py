"""The task format: ``<root>/tasks/<task>/task.json`` plus train/test Parquet parts.

A task is one labelled image-classification dataset. Its parts hold ``image`` (PNG bytes) and
``label`` (int64); ``task.json`` holds its classes, source, licence, counts, image size and
channels. ``task.json`` is written *last*: it is the commit marker, so a task without it is
unfinished and every reader treats it as absent.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from PIL import Image

from tans import paths
from tans.names import NAME_RE, NAME_RULE, is_valid_name
from tans.storage import CorruptArtifact, Storage, StorageError

SPLITS = ("train", "test")
TASK_NAME_RE = NAME_RE  # one rule for every name (tans.names)
PART_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64())])
FORMAT_VERSION = 1


class TaskError(ValueError):
    """A task that cannot be read or written as asked (one-line message)."""


@dataclass
class TaskInfo:
    """The content of ``task.json``."""

    name: str
    classes: list[str]
    source: str
    licence: str
    image_size: int
    channels: int
    counts: dict[str, int]  # images per split: {"train": n, "test": m}
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # per split, per class
    parts: dict[str, list[str]] = field(default_factory=dict)  # part file names per split
    created_at: str = ""
    config: dict = field(default_factory=dict)  # the resolved ingest config that produced it
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_json(cls, obj: dict) -> TaskInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in known})


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name (URL- and path-safe), else raise TaskError."""
    if not is_valid_name(name):
        raise TaskError(f"invalid task name {name!r}: use {NAME_RULE}")
    return name


def task_dir(name: str) -> str:
    return paths.task_dir(check_task_name(name))


def task_exists(storage: Storage, name: str) -> bool:
    """True if the task is complete (its ``task.json`` exists)."""
    return storage.is_file(f"{task_dir(name)}/task.json")


def list_tasks(storage: Storage) -> list[str]:
    """Names of the complete tasks in the storage root."""
    names = []
    for entry in storage.list(paths.TASKS):
        name = entry.split("/", 1)[1]
        if is_valid_name(name) and task_exists(storage, name):
            names.append(name)
    return names


def read_task_info(storage: Storage, name: str) -> TaskInfo:
    if not task_exists(storage, name):
        raise TaskError(f"task {name!r} not found in {storage.uri} (ingest it with `tans data ingest`)")
    return TaskInfo.from_json(storage.read_json(f"{task_dir(name)}/task.json"))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` array (``HxW`` grey or ``HxWx3`` RGB)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decode image bytes to ``uint8`` ``HxW`` (channels=1) or ``HxWx3`` (channels=3)."""
    img: Image.Image = Image.open(io.BytesIO(data))
    if channels == 1:
        img = img.convert("L")
    elif channels == 3:
        img = img.convert("RGB")
    return np.asarray(img)


def write_task(
    storage: Storage,
    info: TaskInfo,
    images: Mapping[str, Sequence[bytes]],
    labels: Mapping[str, Sequence[int]],
    part_rows: int = 5000,
    force: bool = False,
) -> TaskInfo:
    """Write a task's parts, then its ``task.json`` (last). Returns the final ``TaskInfo``.

    ``images[split]`` are PNG bytes and ``labels[split]`` class indices, for both splits.
    An existing task is an error unless ``force``. With ``force`` the new task is built beside the
    old one, then swapped in: its parts get names of their own (``part-<gen>-00000.parquet``), the
    new ``task.json`` replaces the old one in one atomic write, and only then are the parts it no
    longer lists deleted. Until the swap the old task stays complete and readable; a crash at any
    moment leaves the old task or the new one. An unfinished task (no ``task.json``) is cleared.
    """
    name = check_task_name(info.name)
    base = task_dir(name)
    replacing = task_exists(storage, name)
    if replacing and not force:
        raise TaskError(f"task {name!r} already exists in {storage.uri} (use --force to replace it)")
    if storage.exists(base) and not replacing:
        storage.delete(base)  # leftovers of an unfinished write: nothing readable to keep
    prefix = f"part-{uuid.uuid4().hex[:8]}-" if replacing else "part-"
    info.parts, info.counts, info.class_counts = {}, {}, {}
    for split in SPLITS:
        imgs, labs = list(images[split]), np.asarray(labels[split], dtype=np.int64)
        if len(imgs) != len(labs):
            raise TaskError(f"task {name!r}: {len(imgs)} images but {len(labs)} labels in {split}")
        if len(labs) and (labs.min() < 0 or labs.max() >= info.num_classes):
            raise TaskError(f"task {name!r}: labels outside 0..{info.num_classes - 1} in {split}")
        info.parts[split] = []
        for i, start in enumerate(range(0, max(len(imgs), 1), part_rows)):
            part = f"{prefix}{i:05d}.parquet"
            table = pa.table(
                {
                    "image": pa.array(imgs[start : start + part_rows], pa.binary()),
                    "label": labs[start : start + part_rows],
                },
                schema=PART_SCHEMA,
            )
            storage.write_parquet(f"{base}/{split}/{part}", table)
            info.parts[split].append(part)
        info.counts[split] = int(len(labs))
        info.class_counts[split] = np.bincount(labs, minlength=info.num_classes).astype(int).tolist()
    info.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_json(f"{base}/task.json", asdict(info))  # the swap
    if replacing:
        for split in SPLITS:
            for rel in storage.list(f"{base}/{split}"):
                if rel.rsplit("/", 1)[-1] not in info.parts[split]:
                    storage.delete(rel)
    return info


def read_split(storage: Storage, name: str, split: str) -> pa.Table:
    """All rows (``image``, ``label``) of one split of a task, as one Arrow table."""
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    info = read_task_info(storage, name)
    tables = []
    for part in info.parts.get(split, []):
        try:
            tables.append(storage.read_parquet(f"{task_dir(name)}/{split}/{part}"))
        except CorruptArtifact:
            raise
        except StorageError as exc:
            raise TaskError(f"task {name!r} is incomplete: {exc}") from None
    return pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()


def iter_split(storage: Storage, name: str, split: str) -> Iterator[tuple[bytes, int]]:
    """Yield ``(png_bytes, label)`` for every row of a split, part by part."""
    table = read_split(storage, name, split)
    yield from zip(table.column("image").to_pylist(), table.column("label").to_pylist())


def label_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_classes).astype(int).tolist()
