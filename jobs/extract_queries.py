"""Query features for every task of a space: N images per class through a frozen extractor.

    python -m jobs.extract_queries --config configs/space/local.yaml [--tasks a,b] [key=value ...]

Output: ``<root>/queries/<extractor>/<task>.parquet`` (``label``, ``feature``), one atomic write
per task, plus ``<root>/queries/<extractor>/extractor.json``. Finished tasks are skipped unless
``queries.force=true``.

Ray Data runs it: a dataset of task names goes through ``map_batches`` with an actor pool
(``queries.concurrency`` actors), each actor holding one copy of the extractor; an actor reads
its task's train split from the storage root, takes the seeded per-class sample and writes the
features itself, so images and features never pass through the driver. With more nodes, more
actors. The sampling happens inside the actor (not as a ``read_parquet`` filter) because the
sample is drawn per class of each task, which a row-wise reader cannot see.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib

import numpy as np

from jobs._common import as_override, run_main, split_overrides
from tans import paths
from tans.job_configs import QueriesConfig, SpaceConfig, load_job_config, load_splits
from tans.space.features import ExtractorSpec, query_path
from tans.storage import Storage
from tans.zoo.store import ZooError, base_model_rel, read_manifest


def task_seed(seed: int, task: str) -> list[int]:
    """Each task's own sample seed: independent of which other tasks are extracted with it."""
    return [seed, zlib.crc32(task.encode())]


def extractor_spec(cfg: SpaceConfig, storage: Storage) -> ExtractorSpec:
    """The extractor a space config asks for (default: the zoo's base supernet, largest subnet)."""
    manifest = read_manifest(storage, cfg.zoo)  # ZooError (one line) if the zoo is not there
    ex = cfg.extractor
    if ex.kind == "supernet":
        uri = ex.uri or storage.uri_of(base_model_rel(storage, cfg.zoo))
        name = ex.name or (f"{cfg.zoo}-largest" if not ex.uri else "")
        return ExtractorSpec(
            kind="supernet", uri=uri, family=manifest.family, image_size=manifest.image_size, name=name
        )
    return ExtractorSpec(kind=ex.kind, uri=ex.uri, image_size=manifest.image_size, name=ex.name)


class QueryActor:
    """One Ray Data actor: builds the extractor once, then encodes whole tasks."""

    def __init__(self, spec: dict, root: str, per_class: int, seed: int, gpus: float, threads: int):
        import torch

        from tans.space.features import build_extractor

        torch.set_num_threads(max(1, threads))  # one busy thread per granted CPU (see tests/tans/conftest.py)
        device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.storage = Storage(root)
        self.extractor = build_extractor(ExtractorSpec.from_dict(spec), device)
        self.per_class, self.seed = per_class, seed

    def __call__(self, batch: dict) -> dict:
        from tans.space.features import task_query, write_query

        tasks, images, dims, seconds = [], [], [], []
        for task in batch["task"]:
            t0 = time.perf_counter()
            task = str(task)
            seed = task_seed(self.seed, task)
            features, labels = task_query(self.extractor, self.storage, task, self.per_class, seed)
            write_query(self.storage, self.extractor.spec.name, task, features, labels)
            tasks.append(task)
            images.append(len(labels))
            dims.append(features.shape[1])
            seconds.append(time.perf_counter() - t0)
        return {"task": np.asarray(tasks, dtype=object), "images": np.asarray(images),
                "feature_dim": np.asarray(dims), "seconds": np.asarray(seconds)}


def _readable_query(storage: Storage, extractor: str, task: str) -> bool:
    """A finished query file; a damaged one (truncated, garbage) is extracted again, with a note."""
    from tans.storage import CorruptArtifact

    rel = query_path(extractor, task)
    if not storage.is_file(rel):
        return False
    try:
        storage.read_parquet(rel, columns=["label"])
        return True
    except CorruptArtifact as exc:
        print(f"[queries] {exc.args[0].split(';')[0]}: extracting it again")
        return False


def extract_queries(storage: Storage, spec: ExtractorSpec, tasks: list[str], q: QueriesConfig) -> list[dict]:
    """Extract the queries of ``tasks`` not done yet; returns one record per extracted task."""
    from tans.data.tasks import read_task_info

    for t in tasks:
        read_task_info(storage, t)  # TaskError (one line) before any actor starts
    made_by = paths.extractor_file(spec.name)
    stale = (spec.sha256 and storage.is_file(made_by)
             and storage.read_json(made_by).get("sha256", "") not in ("", spec.sha256))
    if stale:
        print(f"[queries] the extractor of {spec.name} changed since its queries were made: extracting them again")
    todo = [t for t in tasks if q.force or stale or not _readable_query(storage, spec.name, t)]
    storage.write_json(paths.extractor_file(spec.name), spec.to_dict())
    if not todo:
        print(f"[queries] all {len(tasks)} tasks already have {spec.name} queries")
        return []
    from tans.space.features import build_extractor

    build_extractor(spec)  # an unreadable checkpoint is one line here, not an actor crash
    from jobs import runtime

    runtime.init_ray()
    import ray.data  # binds `ray` too

    # Ray Data's periodic progress log (every 10 s when stdout is not a terminal) drowns the
    # job's own lines: keep its warnings and errors. Its progress bars still show on a terminal.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    concurrency = min(q.concurrency, len(todo))
    print(f"[queries] {len(todo)} tasks x {q.per_class} images/class through {spec.kind} extractor "
          f"{spec.name} on {concurrency} actor(s)", flush=True)
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"task": t} for t in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        QueryActor,
        fn_constructor_kwargs={
            "spec": spec.to_dict(),
            "root": storage.uri,
            "per_class": q.per_class,
            "seed": q.seed,
            "gpus": q.gpus_per_actor,
            "threads": int(max(1, q.cpus_per_actor)),
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=q.cpus_per_actor,
        num_gpus=q.gpus_per_actor,
    )
    records = ds.take_all()
    print(f"[queries] {len(records)} tasks, {sum(int(r['images']) for r in records)} images in "
          f"{time.perf_counter() - t0:.1f}s -> {storage.uri_of(paths.queries_dir(spec.name))}", flush=True)
    return records


def space_tasks(cfg: SpaceConfig, storage: Storage) -> tuple[list[str], list[str]]:
    """(meta_train tasks, meta_val tasks) of the splits that are in the zoo."""
    splits = load_splits(cfg.splits)
    manifest = read_manifest(storage, cfg.zoo)
    in_zoo = set(manifest.tasks)
    train = [t for t in splits.meta_train if t in in_zoo]
    val = [t for t in splits.meta_val if t in in_zoo]
    if len(train) < 2:
        raise ZooError(f"zoo {cfg.zoo!r} holds {len(train)} meta_train task(s) of {cfg.splits}; a space needs >= 2")
    if not val:
        raise ZooError(f"zoo {cfg.zoo!r} holds no meta_val task of {cfg.splits}: nothing to pick a checkpoint on")
    return train, val


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.extract_queries", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="space config YAML (default: configs/space/local.yaml)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: meta_train + meta_val in the zoo)")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    overrides += [as_override("root", args.root)] if args.root else []
    cfg: SpaceConfig = load_job_config("space", args.config, overrides)
    storage = Storage(cfg.root or None)
    spec = extractor_spec(cfg, storage)
    if args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
    else:
        train, val = space_tasks(cfg, storage)
        tasks = train + val
    extract_queries(storage, spec, tasks, cfg.queries)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
