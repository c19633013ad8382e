"""The model zoo on disk: one Parquet part per task, ``zoo.json`` written last.

``<root>/zoo/<zoo>/part-<task>.parquet`` holds one row per measured subnet (schema below).
A part is written atomically once its task is fully measured, so a resumed build
skips finished tasks and never duplicates rows; ``zoo.json`` (family, image size, config,
splits hash, tasks) is written after every part and marks the zoo complete.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from tans import paths
from tans.storage import CorruptArtifact, Storage, StorageError

ZOO_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("task", pa.string()),
        ("family", pa.string()),
        ("ks", pa.list_(pa.int32())),
        ("e", pa.list_(pa.int32())),
        ("d", pa.list_(pa.int32())),
        ("accuracy", pa.float64()),
        ("n_params", pa.int64()),
        ("flops", pa.int64()),
        ("f_emb", pa.list_(pa.float32())),
        ("supernet_uri", pa.string()),
        ("image_size", pa.int32()),
        ("created_at", pa.string()),
    ]
)


class ZooError(ValueError):
    """A zoo that is missing or inconsistent (one-line message)."""


@dataclass
class ZooRow:
    """One measured subnet: its architecture, task, measurements and functional embedding."""

    model_id: str
    task: str
    family: str
    ks: list[int]
    e: list[int]
    d: list[int]
    accuracy: float
    n_params: int
    flops: int
    f_emb: list[float]
    supernet_uri: str
    image_size: int
    created_at: str = ""


@dataclass
class ZooManifest:
    """The content of ``zoo.json``: what the zoo is and how it was built."""

    name: str
    family: str
    image_size: int
    splits_hash: str
    tasks: list[str]
    rows: int
    config: dict = field(default_factory=dict)
    created_at: str = ""
    parts: str = ""  # "" or the generation folder (g-<id>) holding the parts (a `--force` rebuild)


def zoo_dir(zoo: str) -> str:
    return paths.zoo_dir(zoo)


def part_path(zoo: str, task: str, generation: str = "") -> str:
    """A task's part; a forced rebuild writes its parts in a generation folder beside the live ones.

    ``build-zoo --force`` on a finished zoo writes ``zoo/<zoo>/g-<id>/part-*.parquet`` (and its
    per-task supernets under ``supernets/<zoo>/g-<id>/``); the new ``zoo.json``, whose ``parts``
    names the generation, swaps them in with one atomic write. Until then the old zoo is whole.
    """
    return paths.zoo_part_file(zoo, task, generation)


def rows_to_table(rows: list[ZooRow]) -> pa.Table:
    cols = {name: [getattr(r, name) for r in rows] for name in ZOO_SCHEMA.names}
    return pa.table(cols, schema=ZOO_SCHEMA)


def write_part(storage: Storage, zoo: str, task: str, rows: list[ZooRow], generation: str = "") -> None:
    """Write all rows of one task at once (atomic): a part is either complete or absent."""
    if any(r.task != task for r in rows):
        raise ZooError(f"zoo {zoo}: rows of another task in part-{task}")
    ids = [r.model_id for r in rows]
    if len(set(ids)) != len(ids):
        raise ZooError(f"zoo {zoo}: duplicate model ids in task {task}")
    storage.write_parquet(part_path(zoo, task, generation), rows_to_table(rows))


def finished_tasks(storage: Storage, zoo: str, generation: str = "") -> set[str]:
    """Tasks whose part file exists (complete, since parts are written atomically)."""
    folder = paths.zoo_parts_dir(zoo, generation)
    prefix = f"{folder}/part-"
    return {
        p[len(prefix) : -len(".parquet")]
        for p in storage.list(folder)
        if p.startswith(prefix) and p.endswith(".parquet")
    }


def base_folder(zoo: str, generation: str = "") -> str:
    """The base supernet's folder: ``supernets/<zoo>/base`` or ``supernets/<zoo>/<generation>/base``."""
    return paths.base_dir(zoo, generation)


def base_model_rel(storage: Storage, zoo: str) -> str:
    """The finished base supernet of ``zoo`` (the live generation's): the file its ``done.json`` names.

    ``supernets/<zoo>/base/model.pt`` for a first build; ``build-zoo --force`` builds a whole
    generation ``supernets/<zoo>/g-<id>/base/`` that the manifest swaps in; a standalone forced
    re-pretraining writes ``base/g-<id>/model.pt`` and swaps ``done.json`` (jobs.pretrain_supernet).
    """
    generation = read_manifest(storage, zoo).parts if storage.is_file(paths.zoo_manifest(zoo)) else ""
    folder = base_folder(zoo, generation)
    if storage.is_file(f"{folder}/done.json"):
        model = storage.read_json(f"{folder}/done.json").get("model", "")
        if model:
            return model
    return f"{folder}/model.pt"


def readable_part(storage: Storage, zoo: str, task: str, generation: str = "") -> bool:
    """False (and a note on stdout) when a finished task's part is damaged: the build redoes it."""
    try:
        storage.read_parquet(part_path(zoo, task, generation), columns=["model_id"])
        return True
    except CorruptArtifact as exc:
        print(f"[zoo] {exc.args[0].split(';')[0]}: rebuilding task {task!r}")
        return False


def write_manifest(storage: Storage, manifest: ZooManifest) -> None:
    """Write ``zoo.json`` (the swap), then delete the parts and supernets it no longer names."""
    storage.write_json(paths.zoo_manifest(manifest.name), asdict(manifest))
    drop_stale_generations(storage, manifest.name, manifest.parts)


def drop_stale_generations(storage: Storage, zoo: str, live: str) -> None:
    """Remove other generations' parts and per-task supernets (and the first build's, once replaced)."""
    folders = ((zoo_dir(zoo), ("part-", "build.json")), (paths.supernet_dir(zoo), ("tasks", "base")))
    for folder, first_build in folders:
        for entry in storage.list(folder):
            name = entry.rsplit("/", 1)[-1]
            if (name.startswith("g-") and name != live) or (live and name.startswith(first_build)):
                storage.delete(entry)


def read_manifest(storage: Storage, zoo: str) -> ZooManifest:
    try:
        return ZooManifest(**storage.read_json(paths.zoo_manifest(zoo)))
    except CorruptArtifact:
        raise
    except StorageError:
        raise ZooError(
            f"zoo {zoo!r} not found or unfinished in {storage.uri} (build it with `tans build-zoo`)"
        ) from None


def read_zoo(storage: Storage, zoo: str) -> pa.Table:
    """All rows of a finished zoo (the tasks its manifest lists), as one table."""
    manifest = read_manifest(storage, zoo)
    tables = [storage.read_parquet(part_path(zoo, t, manifest.parts)) for t in manifest.tasks]
    table = pa.concat_tables(tables) if tables else ZOO_SCHEMA.empty_table()
    if table.num_rows != manifest.rows:
        raise ZooError(f"zoo {zoo!r}: manifest says {manifest.rows} rows, parts hold {table.num_rows}")
    return table


def list_zoos(storage: Storage) -> list[str]:
    return [p.split("/", 1)[1] for p in storage.list(paths.ZOO) if storage.is_file(f"{p}/zoo.json")]


def zoo_stats(table: pa.Table) -> dict:
    """Rows, tasks, and per task: accuracy min/median/max, params and FLOPs ranges."""
    tasks = sorted(set(table.column("task").to_pylist()))
    acc = np.asarray(table.column("accuracy").to_pylist())
    params = np.asarray(table.column("n_params").to_pylist())
    flops = np.asarray(table.column("flops").to_pylist())
    task_col = np.asarray(table.column("task").to_pylist())
    per_task = {}
    for t in tasks:
        m = task_col == t
        a = acc[m]
        per_task[t] = {
            "rows": int(m.sum()),
            "accuracy": {"min": float(a.min()), "median": float(statistics.median(a)), "max": float(a.max())},
            "n_params": [int(params[m].min()), int(params[m].max())],
            "flops": [int(flops[m].min()), int(flops[m].max())],
        }
    return {
        "rows": int(table.num_rows),
        "tasks": len(tasks),
        "n_params": [int(params.min()), int(params.max())] if len(params) else [0, 0],
        "flops": [int(flops.min()), int(flops.max())] if len(flops) else [0, 0],
        "per_task": per_task,
    }


def format_stats(name: str, stats: dict) -> str:
    """A small text table of :func:`zoo_stats`."""
    lines = [
        f"zoo {name}: {stats['rows']} rows, {stats['tasks']} tasks, "
        f"params {stats['n_params'][0] / 1e6:.2f}-{stats['n_params'][1] / 1e6:.2f}M, "
        f"FLOPs {stats['flops'][0] / 1e6:.1f}-{stats['flops'][1] / 1e6:.1f}M",
        f"{'task':<22} {'rows':>5} {'acc min':>8} {'median':>8} {'max':>8} {'params (M)':>14} {'MFLOPs':>14}",
    ]
    for t, s in stats["per_task"].items():
        a = s["accuracy"]
        p, f = s["n_params"], s["flops"]
        lines.append(
            f"{t:<22} {s['rows']:>5} {a['min']:>8.3f} {a['median']:>8.3f} {a['max']:>8.3f} "
            f"{p[0] / 1e6:>6.2f}-{p[1] / 1e6:<7.2f} {f[0] / 1e6:>6.1f}-{f[1] / 1e6:<7.1f}"
        )
    return "\n".join(lines)
