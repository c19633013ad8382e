"""CPU cost of the zoo build per (task x subnet), today's recipe against the configured one.

    python bench/zoo_build.py --root ROOT [--config configs/zoo/local.yaml]
                              [--tasks greek_0_10,mnist_0_5] [--subnets 8] [--threads 1]

ROOT must hold the zoo config's base supernet (a finished ``tans build-zoo`` or ``tans demo``
root) and the tasks' ingested data. For every task, each recipe fine-tunes the base supernet on
the task and measures ``--subnets`` subnets (the task's own seeded architecture sample, as the
zoo build draws it: largest and smallest first) exactly as a zoo work item does
(``jobs._zoo_workers``), in this process, on ``--threads`` threads, without Ray: what is timed
is the CPU work, not scheduling.

Recipes:

* ``baseline``: the local profile's fine-tune and measurement settings before the speed-up
  (``BASELINE`` below) on the plain OFA layers (``TANS_FAST_LAYOUT=0``), decoding whole splits
  as the work items did then (``decode_whole_splits``) and counting FLOPs with ``FlopCounterMode``
  (``count_flops_as_before``), run with seeds 0 and 1: the accuracy difference between those two
  seeds is the seed noise the candidate is judged against.
* ``candidate``: the fine-tune and measurement settings of ``--config`` with today's layers
  (``tans.zoo.small_maps.fast_layout``), row-selective decoding and today's FLOP count, seed 0.

Every run counts its subnets' parameters and FLOPs afresh (the count cache is cleared), as in a
zoo build, where every task draws its own architectures.

The recipes run task by task, alternating, so background load on a shared machine hits them
alike. Printed: seconds per (task x subnet) split into data loading, fine-tuning and measuring,
the candidate/baseline ratio against the mean cost of the two baseline runs, which run the same
code (target <= 0.5; a task's data loading and fine-tune count once
for all the ``subnets_per_task`` subnets the recipe measures on it, as in the zoo build), and the
accuracies of both recipes subnet by subnet with the mean absolute difference next to the
baseline's seed-to-seed difference.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs._zoo_workers import _items_per_task, finetune_task, measure_chunks, measure_items
from tans.data import reader
from tans.job_configs import load_job_config
from tans.storage import Storage
from tans.zoo import measure
from tans.zoo.store import base_model_rel
from tans.zoo.subnets import task_archs
from tans.zoo.supernets import get_family

# configs/zoo/local.yaml's finetune and measure sections at commit d7d3097 ("today's" recipe).
BASELINE = {
    "finetune": {"steps": 18, "batch_size": 64, "images_per_task": 800, "lr": 0.02, "random_subnets": 1},
    "measure": {"subnets_per_task": 16, "bn_batches": 2, "bn_batch_size": 64, "test_images": 400, "probe_size": 16},
}
BASELINE_ITEMS_PER_TASK = 4  # measurement work items per task then (4 subnets each)


def recipe_of(cfg) -> dict:
    f, m = cfg.finetune, cfg.measure
    return {
        "finetune": {
            "steps": f.steps,
            "batch_size": f.batch_size,
            "images_per_task": f.images_per_task,
            "lr": f.lr,
            "random_subnets": f.random_subnets,
        },
        "measure": {
            "subnets_per_task": m.subnets_per_task,
            "bn_batches": m.bn_batches,
            "bn_batch_size": m.bn_batch_size,
            "test_images": m.test_images,
            "probe_size": m.probe_size,
        },
    }


@contextlib.contextmanager
def decode_whole_splits():
    """Work items decode every image of a split and keep the rows they need (the code before)."""
    selective = reader.load_task_rows

    def whole_then_pick(storage, task, split, image_size, pick, channels=3):
        data = selective(storage, task, split, image_size, None, channels)
        if pick is None:
            return data
        idx = pick(len(data))
        return reader.TaskTensors(data.images[idx], data.labels[idx], data.num_classes)

    reader.load_task_rows = whole_then_pick
    try:
        yield
    finally:
        reader.load_task_rows = selective


@contextlib.contextmanager
def count_flops_as_before():
    """Count FLOPs with ``FlopCounterMode`` itself, as the code before did (``flops_of`` now sums
    the same formulas without its per-module bookkeeping, ~7x cheaper; the totals are equal)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tans.zoo import model_ops

    fast = model_ops.flops_of

    def flop_counter_mode(module, x):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        return int(counter.get_total_flops())

    model_ops.flops_of = flop_counter_mode
    try:
        yield
    finally:
        model_ops.flops_of = fast


def recipe_config(cfg, recipe: dict):
    """``cfg`` with ``recipe``'s fine-tune and measurement settings."""
    return dataclasses.replace(cfg, force=True, finetune=dataclasses.replace(cfg.finetune, **recipe["finetune"]),
                               measure=dataclasses.replace(cfg.measure, **recipe["measure"]))


def build_task(storage: Storage, cfg, base_rel: str, task: str, archs: list, generation: str, items: int) -> dict:
    """One task's zoo work items (``jobs._zoo_workers``), in this process: seconds and accuracies.

    The measurement items are cut as ``build_tasks`` cuts them into ``items`` per task, so each
    item's fixed cost (loading data and the supernet) is shared by as many subnets as in the zoo
    build.
    """
    t0 = time.perf_counter()
    supernet = finetune_task(storage.uri, cfg, base_rel, task, generation)
    t1 = time.perf_counter()
    rows = []
    for chunk in measure_chunks(cfg, archs, items):
        rows += measure_items(storage.uri, cfg, task, supernet, chunk)["rows"]
    t2 = time.perf_counter()
    return {"finetune": t1 - t0, "measure": t2 - t1, "accuracy": [r["accuracy"] for r in rows]}


def scratch_root(root: Storage, cfg) -> tuple[Storage, str]:
    """A temporary root that sees ``root``'s tasks, with a copy of its base supernet (and its path)."""
    tmp = Path(tempfile.mkdtemp(prefix="tans-bench-zoo-"))
    (tmp / "tasks").symlink_to(Path(root.uri) / "tasks")
    storage = Storage(str(tmp))
    base_rel = base_model_rel(root, cfg.name)
    storage.write_bytes(base_rel, root.read_bytes(base_rel))
    return storage, base_rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--config", default="configs/zoo/local.yaml")
    ap.add_argument("--tasks", default="greek_0_10,mnist_0_5")
    ap.add_argument("--subnets", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_job_config("zoo", args.config, [f"root={args.root}"])
    storage, base_rel = scratch_root(Storage(cfg.root), cfg)
    family = get_family(cfg.family)
    # name: (recipe, seed, today's code?)
    runs = {
        "baseline": (BASELINE, 0, False),
        "baseline_seed1": (BASELINE, 1, False),
        "candidate": (recipe_of(cfg), 0, True),
    }
    out: dict[str, dict[str, dict]] = {name: {} for name in runs}
    tasks = [t for t in args.tasks.split(",") if t]
    # Warm-up, not timed: the first work item of a process also pays one-time costs (torch's
    # lazy imports and kernels, the page cache), which would otherwise land on the first recipe.
    warm_cfg = dataclasses.replace(recipe_config(cfg, BASELINE), seed=0)
    warm_cfg = dataclasses.replace(warm_cfg, finetune=dataclasses.replace(warm_cfg.finetune, steps=2))
    build_task(storage, warm_cfg, base_rel, tasks[0], task_archs(family, 2, cfg.measure.seed, tasks[0],
                                                                 cfg.measure.per_task_archs)[:1], "bench-warmup", 1)
    for task in tasks:
        archs = task_archs(family, cfg.measure.subnets_per_task, cfg.measure.seed, task,
                           cfg.measure.per_task_archs)[: args.subnets]
        for name, (recipe, seed, today) in runs.items():
            os.environ["TANS_FAST_LAYOUT"] = "1" if today else "0"
            run_cfg = dataclasses.replace(recipe_config(cfg, recipe), seed=seed)
            # Every recipe counts its subnets' sizes afresh, as a zoo build does: each task draws
            # its own architectures, so the process-wide count cache only ever helps within a task.
            measure._COUNT_CACHE.clear()
            with contextlib.ExitStack() as before:
                if not today:
                    before.enter_context(decode_whole_splits())
                    before.enter_context(count_flops_as_before())
                items = _items_per_task(run_cfg) if today else BASELINE_ITEMS_PER_TASK
                out[name][task] = build_task(storage, run_cfg, base_rel, task, archs, f"bench-{name}", items)
            r = out[name][task]
            print(f"[bench] {task:16s} {name:15s} finetune {r['finetune']:6.1f}s  "
                  f"measure {r['measure']:6.1f}s  mean acc {statistics.mean(r['accuracy']):.3f}", flush=True)

    def per_cell(name: str, stage: str | None = None) -> float:
        """Seconds per (task x subnet): a task's data loading and fine-tune are shared by all its subnets."""
        shared = runs[name][0]["measure"]["subnets_per_task"]
        per = {"finetune": shared, "measure": args.subnets}
        stages = [stage] if stage else list(per)
        return sum(out[name][t][s] / per[s] for t in tasks for s in stages) / len(tasks)

    def mean_abs_diff(a: str, b: str) -> float:
        return statistics.mean(abs(x - y) for t in tasks for x, y in zip(out[a][t]["accuracy"], out[b][t]["accuracy"]))

    print(f"\nseconds per (task x subnet), {len(tasks)} tasks x {args.subnets} subnets, {args.threads} thread(s)")
    print(f"{'recipe':15s} {'finetune':>9s} {'measure':>8s} {'total':>7s}")
    for name in ("baseline", "candidate"):
        print(f"{name:15s} {per_cell(name, 'finetune'):9.2f} "
              f"{per_cell(name, 'measure'):8.2f} {per_cell(name):7.2f}")
    # Both baseline runs are the same code and recipe (only the seed differs), so each is a
    # measurement of its cost: the ratio is taken against their mean, and against each.
    baseline_cost = (per_cell("baseline") + per_cell("baseline_seed1")) / 2
    ratio = per_cell("candidate") / baseline_cost
    noise, diff = mean_abs_diff("baseline", "baseline_seed1"), mean_abs_diff("baseline", "candidate")
    print(f"{'baseline seed 1':15s} {per_cell('baseline_seed1', 'finetune'):9.2f} "
          f"{per_cell('baseline_seed1', 'measure'):8.2f} {per_cell('baseline_seed1'):7.2f}")
    print(f"\ncandidate / baseline cost (mean of the two baseline runs): {ratio:.2f}  "
          f"(target <= 0.50: {'met' if ratio <= 0.5 else 'missed'}); against each run: "
          f"{per_cell('candidate') / per_cell('baseline'):.2f} / "
          f"{per_cell('candidate') / per_cell('baseline_seed1'):.2f}")
    print("accuracy, subnet by subnet: |candidate - baseline| mean "
          f"{100 * diff:.1f} pts; seed noise |baseline seed 0 - seed 1| mean {100 * noise:.1f} pts")
    print(
        f"mean accuracy: baseline {100 * statistics.mean(a for t in tasks for a in out['baseline'][t]['accuracy']):.1f}"
        f" %, seed 1 {100 * statistics.mean(a for t in tasks for a in out['baseline_seed1'][t]['accuracy']):.1f}"
        f" %, candidate {100 * statistics.mean(a for t in tasks for a in out['candidate'][t]['accuracy']):.1f} %"
    )
    shutil.rmtree(storage.uri, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ratio": ratio, "accuracy_diff": diff, "seed_noise": noise, "runs": out,
                       "baseline": BASELINE, "candidate": recipe_of(cfg), "cfg": dataclasses.asdict(cfg)}, f, indent=1)


if __name__ == "__main__":
    main()
