"""Data stage: list the built-in corpus and ingest datasets into the storage root.

    python -m jobs.data list [--json]
    python -m jobs.data ingest SRC [--name NAME] [--image-size N] [--test-fraction F] [--force]
                               [--config configs/data/local.yaml] [key=value ...]

SRC is an ImageFolder directory (local path or ``s3://``), ``builtin:<source>``,
``builtin:<task>`` or ``builtin:all``. ``tans data ...`` runs exactly this.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jobs._common import as_override, run_main, split_overrides
from tans.config import to_dict
from tans.data.builtin import catalog
from tans.data.builtin.registry import all_sources
from tans.data.ingest import IngestError, IngestReport, decode_in_process, ingest_imagefolder
from tans.data.tasks import task_exists
from tans.job_configs import IngestConfig, load_job_config
from tans.paths import task_dir
from tans.storage import Storage


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tans data", description="Built-in corpus and dataset ingest.")
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="built-in sources and the tasks they yield")
    lst.add_argument("--json", action="store_true", help="print a JSON array (task, source, classes, train, test, ...)")
    ing = sub.add_parser("ingest", help="turn an ImageFolder or a built-in source into task(s)")
    ing.add_argument("src", help="ImageFolder dir (local or s3://), builtin:<source>, builtin:<task> or builtin:all")
    ing.add_argument("--name", help="task name (required for an ImageFolder)")
    ing.add_argument("--image-size", type=int, help="square image size in px (default: native / first image, <= 64)")
    ing.add_argument("--test-fraction", type=float, help="share of each class held out for test (ImageFolder)")
    ing.add_argument("--force", action="store_true", help="replace a task that already exists")
    ing.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    ing.add_argument("--config", help="ingest config YAML (default: configs/data/local.yaml)")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    args.overrides = overrides
    return args


def list_corpus(as_json: bool) -> int:
    specs = catalog.all_task_specs()
    if as_json:
        print(json.dumps([s.as_dict() for s in specs], indent=1))
        return 0
    sources = all_sources()
    print(
        f"{len(specs)} built-in tasks from {len(sources)} sources (materialise with `tans data ingest builtin:all`)\n"
    )
    for name, src in sources.items():
        tasks = [s for s in specs if s.source == name]
        print(f"{name}: {len(src.class_names())} classes, {src.image_size}px x{src.channels} - {src.description}")
        print(f"    origin: {src.origin}; licence: {src.licence}")
        for t in tasks:
            print(f"    {t.task:<22} {t.classes:>3} classes {t.train:>6} train {t.test:>6} test")
    return 0


def ingest(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in (("image_size", "image_size"), ("test_fraction", "test_fraction"), ("root", "root")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(as_override(key, value))
    if args.force:
        overrides.append("force=true")
    cfg: IngestConfig = load_job_config("data", args.config, overrides)
    storage = Storage(cfg.root or None)
    if args.src.startswith(catalog.PREFIX):
        return ingest_builtin(storage, args.src, args.name, cfg)
    if not args.name:
        raise IngestError("--name is required for an ImageFolder (the task's name in the storage root)")
    used = {"engine": "local"}

    def decode_many(fs, paths, image_size):
        # Chosen on the listing ingest_imagefolder already made: large inputs decode on Ray Data.
        if len(paths) < cfg.ray_min_images:
            return decode_in_process(fs, paths, image_size)
        from jobs import runtime

        runtime.init_ray()
        used["engine"] = "ray-data"
        return runtime.decode_with_ray_data(fs, paths, image_size)

    report = ingest_imagefolder(
        storage,
        args.src,
        args.name,
        image_size=cfg.image_size,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        force=cfg.force,
        part_rows=cfg.part_rows,
        decode_many=decode_many,
        config=to_dict(cfg),
    )
    report.engine = used["engine"]
    print(report.summary())
    print(f"written to {storage.uri_of(task_dir(args.name))}")
    return 0


def ingest_builtin(storage: Storage, src: str, name: str | None, cfg: IngestConfig) -> int:
    specs = catalog.resolve(src)
    if name and (len(specs) != 1 or name != specs[0].task):
        raise IngestError("--name cannot rename built-in tasks; their names are fixed (see `tans data list`)")
    if len(specs) == 1 and task_exists(storage, specs[0].task) and not cfg.force:
        raise IngestError(f"task {specs[0].task!r} already exists in {storage.uri} (use --force to replace it)")
    todo = [s for s in specs if cfg.force or not task_exists(storage, s.task)]
    if len(todo) < len(specs):
        print(f"{len(specs) - len(todo)} task(s) already in {storage.uri}; skipping them (--force rebuilds)")
    t0 = time.perf_counter()
    reports = list(_materialise_all(storage, todo, cfg))
    images = sum(r.info.counts["train"] + r.info.counts["test"] for r in reports)
    seconds = time.perf_counter() - t0
    print(f"materialised {len(reports)} task(s), {images} images, in {seconds:.1f}s -> {storage.uri_of('tasks')}")
    return 0


def _materialise_all(storage: Storage, specs: list[catalog.TaskSpec], cfg: IngestConfig):
    from tqdm import tqdm

    config = to_dict(cfg)
    bar = tqdm(total=len(specs), desc="tasks", unit="task", file=sys.stderr, disable=True if len(specs) < 2 else None)
    if cfg.ray_for_builtin and len(specs) > 1:
        from jobs import runtime

        runtime.init_ray()
        results = runtime.materialise_builtin_with_ray(
            storage.uri, specs, cfg.image_size, cfg.force, cfg.part_rows, config
        )
    else:
        results = ((s, _try(storage, s, cfg, config)) for s in specs)
    failed = []
    for spec, result in results:
        bar.update(1)
        if isinstance(result, IngestReport):
            bar.write(result.summary(), file=sys.stderr)
            yield result
        else:
            failed.append(f"{spec.task}: {result}")
    bar.close()
    if failed:
        raise IngestError(f"{len(failed)} task(s) failed, first: {failed[0]}")


def _try(storage: Storage, spec: catalog.TaskSpec, cfg: IngestConfig, config: dict):
    try:
        return catalog.materialise(storage, spec, cfg.image_size, cfg.force, cfg.part_rows, config=config)
    except IngestError as exc:
        return exc


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "list":
        return list_corpus(args.json)
    return ingest(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
