"""Build a model zoo: base supernet -> per-task supernets -> measured subnets -> zoo rows.

    python -m jobs.build_zoo --config configs/zoo/local.yaml [--force] [key=value ...]

1. Pretrain the base supernet on the pooled meta_train tasks (Ray Train, `jobs.pretrain_supernet`);
   a finished run is reused.
2. Fine-tune it per task (meta_train + meta_val), one Ray task per task with its CPU/GPU share:
   these tasks are small (about a thousand images), so a DDP worker group per task would spend
   more time starting (~30 s) than training; the fan-out across tasks is what scales.
3. Measure M subnets per task: work items of a few subnets each fan out as Ray tasks; each
   item depends on its task's fine-tune, so measuring overlaps with fine-tuning.
4. One Parquet part per task, written atomically when the task is complete; `zoo.json` last.

Rerunning skips finished tasks (`force=true` redoes them); a resumed build gives the same
model ids and measurements. `tans build-zoo` runs exactly this.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime

from jobs._common import as_override, run_main, split_overrides
from tans import paths
from tans.config import to_dict
from tans.data.tasks import TaskError, task_exists
from tans.job_configs import ZooConfig, load_job_config, load_splits
from tans.storage import Storage, new_generation
from tans.zoo.store import (
    ZooError,
    ZooManifest,
    base_folder,
    finished_tasks,
    format_stats,
    part_path,
    read_manifest,
    read_zoo,
    readable_part,
    write_manifest,
    zoo_stats,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tans build-zoo", description="Build a model zoo (see configs/zoo/).")
    parser.add_argument("--config", help="zoo config YAML (default: configs/zoo/local.yaml)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--force", action="store_true", help="redo finished tasks (and the base supernet)")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    args.overrides = (
        overrides + ([as_override("root", args.root)] if args.root else []) + (["force=true"] if args.force else [])
    )
    return args


def plan_tasks(cfg: ZooConfig, storage: Storage) -> tuple[list[str], list[str], str]:
    """(zoo tasks, pretraining tasks, splits hash), checked against the splits and the root."""
    splits = load_splits(cfg.splits)
    tasks = list(cfg.tasks) or [*splits.meta_train, *splits.meta_val]
    pretrain = list(cfg.pretrain_tasks) or list(splits.meta_train)
    if not tasks:
        raise ZooError("no tasks to build a zoo on (tasks and the splits' meta_train/meta_val are empty)")
    if not pretrain:
        raise ZooError("no tasks to pretrain the base supernet on (pretrain_tasks and meta_train are empty)")
    held_out = set(splits.meta_test)
    for t in tasks:
        if t in held_out:
            raise ZooError(f"task {t!r} is meta_test in {cfg.splits}: it must stay out of the zoo")
    for t in pretrain:
        if t not in splits.meta_train:
            raise ZooError(
                f"pretrain task {t!r} is not meta_train in {cfg.splits}: base pretraining uses meta_train only"
            )
    for t in dict.fromkeys([*pretrain, *tasks]):
        if not task_exists(storage, t):
            raise TaskError(f"task {t!r} not found in {storage.uri} (run `tans data ingest builtin:all` or ingest it)")
    return tasks, pretrain, splits.digest()


def check_existing_zoo(storage: Storage, cfg: ZooConfig, splits_hash: str) -> None:
    """A zoo name is reused only for the same family, image size and splits."""
    path = paths.zoo_manifest(cfg.name)
    if not storage.is_file(path) or cfg.force:
        return
    old = storage.read_json(path)
    for key, new in (("family", cfg.family), ("image_size", cfg.image_size), ("splits_hash", splits_hash)):
        if old.get(key) != new:
            raise ZooError(
                f"zoo {cfg.name!r} exists with {key}={old.get(key)!r}, not {new!r}: pick another name or use --force"
            )
    # zoos written before per-task sampling existed measured the same archs on every task
    old_per_task = bool(old.get("config", {}).get("measure", {}).get("per_task_archs", False))
    if old_per_task != cfg.measure.per_task_archs:
        raise ZooError(f"zoo {cfg.name!r} exists with measure.per_task_archs={old_per_task}: a resumed build would "
                       "mix two architecture samples; pick another name or use --force")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg: ZooConfig = load_job_config("zoo", args.config, args.overrides)
    from tans.zoo.supernets import get_family

    family = get_family(cfg.family)  # an unknown family fails here, before any work
    storage = Storage(cfg.root or None)
    tasks, pretrain_tasks, splits_hash = plan_tasks(cfg, storage)
    check_existing_zoo(storage, cfg, splits_hash)
    from tans.lease import Lease

    with Lease(storage, paths.zoo_dir(cfg.name), what="tans build-zoo") as lease:
        t0 = time.perf_counter()
        print(f"[zoo] {cfg.name}: family {family.name}, {cfg.image_size}px, {len(tasks)} tasks, "
              f"{cfg.measure.subnets_per_task} subnets per task -> {storage.uri_of(paths.zoo_dir(cfg.name))}")
        # A finished zoo is never rebuilt in place: --force builds a new generation beside it - base
        # supernet, per-task supernets and parts (tans.zoo.store.part_path) - swapped in by the manifest
        # written last. Until then the old zoo, and the spaces built on it, stay whole.
        live = read_manifest(storage, cfg.name).parts if storage.is_file(paths.zoo_manifest(cfg.name)) else None
        generation = new_generation() if cfg.force and live is not None else (live or "")
        storage.write_json(paths.supernet_config_file(cfg.name),
                           {k: v for k, v in to_dict(cfg).items() if k != "force"})

        from jobs import runtime
        from jobs.pretrain_supernet import pretrain_base

        runtime.init_ray()
        if generation and generation != live:  # a fresh generation: nothing in it to reuse
            base_rel = pretrain_base(replace(cfg, force=False), storage, pretrain_tasks,
                                     base=paths.base_dir(cfg.name, generation))
        else:
            base_rel = pretrain_base(cfg, storage, pretrain_tasks, base=base_folder(cfg.name, generation))
        print(f"[zoo] base supernet: {storage.uri_of(base_rel)} ({time.perf_counter() - t0:.0f}s)")

        done = set() if cfg.force else {t for t in finished_tasks(storage, cfg.name, generation)
                                        if readable_part(storage, cfg.name, t, generation)}
        todo = [t for t in tasks if t not in done]
        if len(todo) < len(tasks):
            print(f"[zoo] {len(tasks) - len(todo)} task(s) already measured; skipping them (--force redoes them)")
        if todo:
            from jobs._zoo_workers import build_tasks

            nodes = build_tasks(cfg, storage, base_rel, todo, generation)
            build_rel = paths.zoo_build_file(cfg.name, generation)
            storage.write_json(build_rel, {"items": nodes, "finished_at": _now()})
        rows = sum(read_zoo_part_rows(storage, cfg.name, t, generation) for t in tasks)
        lease.check()  # another writer took the zoo over: leave the manifest to it
        write_manifest(
            storage,
            ZooManifest(cfg.name, family.name, cfg.image_size, splits_hash, tasks, rows, to_dict(cfg), _now(),
                        parts=generation),
        )
        table = read_zoo(storage, cfg.name)
        print(format_stats(cfg.name, zoo_stats(table)))
        print(f"[zoo] done in {time.perf_counter() - t0:.0f}s: {rows} rows "
              f"-> {storage.uri_of(paths.zoo_dir(cfg.name))}")
    return 0


def read_zoo_part_rows(storage: Storage, zoo: str, task: str, generation: str = "") -> int:
    import pyarrow.parquet as pq

    path = storage.path(part_path(zoo, task, generation))
    return pq.ParquetFile(storage.fs.open_input_file(path)).metadata.num_rows


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(run_main(main))
