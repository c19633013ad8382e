"""`tans demo`: the whole pipeline end to end on the built-in corpus, on a local Ray.

    python -m jobs.demo [--config configs/demo/local.yaml] [key=value ...]

Stages: data (materialise every task the splits config names), the model zoo (`tans build-zoo`
with the demo's zoo config), the cross-modal space (`tans train-space` on that zoo), and one
`tans search` (with --oracle) per meta_test task under the demo's constraints. Finished stages
and searches are reused, so a second run only prints the table. The table (test accuracy %,
mean ± std over seeds where repeated) goes to stdout and <root>/demo/table.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs._common import as_override, run_main, split_overrides
from jobs.data import _materialise_all
from tans import paths
from tans.config import to_dict
from tans.data.builtin import catalog
from tans.data.ingest import IngestError
from tans.data.tasks import read_task_info, task_exists
from tans.job_configs import DemoConfig, load_job_config, load_splits
from tans.storage import Storage


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tans demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="demo config YAML (default: configs/demo/local.yaml)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    args.overrides = overrides + ([as_override("root", args.root)] if args.root else [])
    return args


def run_data_stage(storage: Storage, cfg: DemoConfig) -> list[str]:
    """Materialise every task of the splits config that is not in the storage root yet."""
    splits = load_splits(cfg.splits)
    known = {s.task: s for s in catalog.all_task_specs()}
    unknown = [t for t in splits.all_tasks() if t not in known and not task_exists(storage, t)]
    if unknown:
        raise IngestError(f"{cfg.splits}: task {unknown[0]!r} is neither built in nor in {storage.uri}")
    todo = [known[t] for t in splits.all_tasks() if t in known and (cfg.data.force or not task_exists(storage, t))]
    print(f"[data] {len(splits.all_tasks())} tasks in {cfg.splits} "
          f"({len(splits.meta_train)} meta-train, {len(splits.meta_val)} meta-val, {len(splits.meta_test)} meta-test); "
          f"{len(todo)} to materialise")
    list(_materialise_all(storage, todo, cfg.data))
    return splits.all_tasks()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg: DemoConfig = load_job_config("demo", args.config, args.overrides)
    storage = Storage(cfg.root or None)
    t0 = time.perf_counter()
    print(f"[demo] storage root: {storage.uri}")
    tasks = run_data_stage(storage, cfg)
    storage.write_json(paths.DEMO_CONFIG, to_dict(cfg))
    images = sum(sum(read_task_info(storage, t).counts.values()) for t in tasks)
    print(f"[data] done: {len(tasks)} tasks, {images} images under {storage.uri_of(paths.TASKS)} "
          f"({time.perf_counter() - t0:.1f}s)")
    if cfg.zoo:
        from jobs import build_zoo

        # the zoo must use the demo's splits, so a demo with other splits never mixes zoos
        code = build_zoo.main(
            ["--config", cfg.zoo, as_override("root", storage.uri), as_override("splits", cfg.splits)]
        )
        if code:
            return code
    space_name = ""
    if cfg.zoo and cfg.space:
        from jobs import train_space

        zoo_name = load_job_config("zoo", cfg.zoo).name
        space_cfg = load_job_config(
            "space",
            cfg.space,
            [as_override("root", storage.uri), as_override("splits", cfg.splits), as_override("zoo", zoo_name)],
        )
        train_space.train_space(space_cfg, storage)
        space_name = space_cfg.name
    if not (cfg.zoo and cfg.space and cfg.search):
        print("[demo] ran the stages its config names (zoo, space and search are needed for the table)")
        return 0
    rows = run_search_stage(storage, cfg, space_name)
    print()
    print(format_demo_table(rows))
    pointer = evaluation_pointer(storage, space_name, cfg.evaluate)
    print(pointer)
    storage.write_json(paths.DEMO_TABLE_JSON, rows)
    storage.write_text(paths.DEMO_TABLE_MD, format_demo_table(rows) + "\n\n" + pointer + "\n")
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s; table in {storage.uri_of(paths.DEMO_TABLE_MD)}, "
          f"reports in {storage.uri_of(paths.SEARCHES)}")
    return 0


COLUMNS = [("TANS pick", "tans"), ("scratch", "scratch"), ("scratch (matched compute)", "scratch_matched"),
           ("generic", "generic"), ("random", "random"), ("nearest", "nearest_dataset"), ("LogME", "logme"),
           ("oracle", "oracle")]


def run_search_stage(storage: Storage, cfg: DemoConfig, space: str) -> list[dict]:
    """One search per meta_test task (finished searches are reused); a row of the table each."""
    from jobs import search as search_job

    splits = load_splits(cfg.splits)
    rows = []
    for i, task in enumerate(splits.meta_test):
        print(f"[demo] search {i + 1}/{len(splits.meta_test)}: {task}", flush=True)
        overrides = [as_override("root", storage.uri), as_override("space", storage.uri_of(paths.space_dir(space))),
                     as_override("dataset", task),
                     "oracle=true", f"name=demo-{task}"]
        if cfg.max_params:
            overrides.append(f"max_params={cfg.max_params}")
        if cfg.max_flops:
            overrides.append(f"max_flops={cfg.max_flops}")
        report = search_job.search(load_job_config("search", cfg.search, overrides), storage)
        row = {"dataset": task, "search_seconds": report["search_seconds"], "winner": report["winner"]["model_id"],
               "tans": report["winner_result"]}
        row.update({name: report["baselines"].get(name) for _, name in COLUMNS[1:]})
        rows.append(row)
    return rows


def evaluation_pointer(storage: Storage, space: str, config: str) -> str:
    """Where the comparison with intervals is: one seed per search here, seeds and pools there."""
    where = storage.uri_of(f"{paths.evaluation_dir(space)}/evaluation.md")
    state = "" if storage.is_file(f"{paths.evaluation_dir(space)}/evaluation.json") else " (not run yet on this root)"
    return (f"One seed per search above; single-seed gaps of a few points are noise. Weighted Kendall tau and regret "
            f"over seeds with 95% intervals: `tans evaluate --config {config} --root {storage.uri}` "
            f"-> {where}{state}")


def _fmt(entry) -> str:
    if not entry or entry.get("test_accuracy") is None:
        return "—"
    s = f"{100 * entry['test_accuracy']:.1f}"
    return s + (f"±{100 * entry['std']:.1f}" if entry.get("n", 1) > 1 and entry.get("std") else "")


def format_demo_table(rows: list[dict]) -> str:
    """dataset | TANS pick | baselines ... | search time, test accuracy in %, plus a mean row."""
    head = "| dataset | " + " | ".join(c for c, _ in COLUMNS) + " | search time |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        lines.append(f"| {r['dataset']} | " + " | ".join(_fmt(r[k]) for _, k in COLUMNS)
                     + f" | {r['search_seconds']:.0f} s |")
    if len(rows) > 1:
        means = []
        for _, k in COLUMNS:
            vals = [r[k]["test_accuracy"] for r in rows if r.get(k) and r[k].get("test_accuracy") is not None]
            means.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "—")
        total = sum(r["search_seconds"] for r in rows)
        lines.append("| **mean** | " + " | ".join(means) + f" | {total:.0f} s total |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(run_main(main))
