"""The built-in task catalogue: which tasks each source yields, and materialising them.

``builtin:<source>`` names every task of a source, ``builtin:<task>`` one task and
``builtin:all`` everything. Counts come from :meth:`BuiltinSource.plan` (cheap), so
``tans data list`` never renders an image.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from tans.data.builtin.base import BuiltinSource, SourceUnavailable
from tans.data.builtin.registry import all_sources
from tans.data.ingest import IngestError, IngestReport
from tans.data.tasks import TaskInfo, encode_png, task_exists, write_task
from tans.storage import Storage

PREFIX = "builtin:"


@dataclass(frozen=True)
class TaskSpec:
    """One built-in task: its name, source, class range and planned image counts."""

    task: str
    source: str
    start: int
    end: int
    classes: int
    train: int
    test: int
    image_size: int
    channels: int

    def as_dict(self) -> dict:
        return asdict(self)


def source(name: str) -> BuiltinSource:
    sources = all_sources()
    if name not in sources:
        raise IngestError(f"unknown built-in source {name!r} (known: {', '.join(sources)}; see `tans data list`)")
    return sources[name]


def source_tasks(src: BuiltinSource) -> list[TaskSpec]:
    """The tasks of one source, with their planned counts."""
    specs = []
    for start, end in src.task_ranges():
        counts = src.plan(start, end)
        specs.append(
            TaskSpec(
                task=f"{src.name}_{start}_{end}",
                source=src.name,
                start=start,
                end=end,
                classes=end - start,
                train=sum(c.train for c in counts),
                test=sum(c.test for c in counts),
                image_size=src.image_size,
                channels=src.channels,
            )
        )
    return specs


def all_task_specs() -> list[TaskSpec]:
    """Every built-in task of every source whose data is installed, in a fixed order."""
    specs = []
    for src in all_sources().values():
        specs.extend(source_tasks(src))
    return specs


def resolve(spec: str) -> list[TaskSpec]:
    """``builtin:all``, ``builtin:<source>`` or ``builtin:<task>`` to the tasks it names."""
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    if name == "all":
        return all_task_specs()
    sources = all_sources()
    if name in sources:
        return source_tasks(sources[name])
    src_name = name.split("_", 1)[0]
    if src_name in sources:
        for t in source_tasks(sources[src_name]):
            if t.task == name:
                return [t]
    raise IngestError(f"unknown built-in dataset {spec!r} (run `tans data list` for the sources and tasks)")


def materialise(
    storage: Storage,
    spec: TaskSpec,
    image_size: int = 0,
    force: bool = False,
    part_rows: int = 5000,
    config: dict | None = None,
) -> IngestReport:
    """Render/load one built-in task and write it to ``storage``; returns an IngestReport.

    ``image_size`` 0 keeps the source's native size.
    """
    t0 = time.perf_counter()
    if task_exists(storage, spec.task) and not force:
        raise IngestError(f"task {spec.task!r} already exists in {storage.uri} (use --force to replace it)")
    src = source(spec.source)
    try:
        src.check_available()
    except SourceUnavailable as exc:
        raise IngestError(f"builtin:{spec.source}: {exc}") from None
    loaded = src.load(spec.start, spec.end)
    size = image_size or src.image_size
    images: dict[str, list[bytes]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for img, lab, split in zip(loaded.images, loaded.labels, loaded.splits):
        if img.shape[0] != size:
            mode = Image.Resampling.BICUBIC if size > img.shape[0] else Image.Resampling.LANCZOS
            img = np.asarray(Image.fromarray(img).resize((size, size), mode))
        images[split].append(encode_png(img))
        labels[split].append(int(lab))
    info = TaskInfo(
        name=spec.task,
        classes=src.class_names()[spec.start : spec.end],
        source=f"{PREFIX}{spec.source} ({src.origin})",
        licence=src.licence,
        image_size=size,
        channels=src.channels,
        counts={},
        config=dict(config or {}),
    )
    info = write_task(storage, info, images, labels, part_rows=part_rows, force=force)
    return IngestReport(info, {}, time.perf_counter() - t0, "builtin")
