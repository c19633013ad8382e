"""Ray Tune's parallel fine-tuning vs the same trials one by one, and what ASHA saves.

    python bench/tune_parallel.py [--quick] [--cpus 2] [--trials 4] [--epochs 8] [--train 608] [--val 128]
                                  [--asha-trials 8] [--asha-epochs 4] [--seeds 5] [--ray-niceness]

Part 1 (parallel efficiency). ``--trials`` equal trials (same config: fine-tune ``ofa_mbv3_tiny``'s
largest subnet at 32 px on a synthetic task with :func:`tans.selection.finetune.finetune`, reporting every
epoch with ``ray.tune.report``) run through a ``Tuner`` with ``tune.with_resources(.., {"cpu": 1})``,
so ``k = min(trials, floor(cluster CPUs / CPUs per trial))`` run at once; every trial sets
``torch.set_num_threads(1)``. The ratio is

    wall time of ``Tuner.fit()``  /  (sum of the same trials run one by one / k)     (target <= 1.15)

The baseline runs the same trial function in this process, one trial after another, on one
thread, with a no-op report: it is the ideal that parallel Tune should reach, so the ratio counts
*all* of Tune's costs (trial actors and their imports, the controller loop, result reporting and
syncing, two trainings sharing caches and memory bandwidth). A baseline through Tune with
``max_concurrent_trials=1`` would carry the same per-trial costs as the parallel run and hide them.
Half the baseline trials run before the Tune run and half after, so a drift in the background
load of a shared machine hits both sides alike. Ray starts its workers at niceness 15, which
under other users' load gives a trial a fraction of the core the baseline (niceness 0) gets;
that is a scheduling policy, not a cost of Tune, so workers here run at this process's niceness
(``--ray-niceness`` keeps Ray's default). Trial actors are reused (``reuse_actors=True``): a
fresh actor per trial would re-import torch and the zoo's code (~2 CPU-seconds here; ~4.5 before
``tans.zoo.ofa_loader_stub`` kept OFA from importing torchvision).
Ray starts a new worker process for every actor, Tune's trial actors included (measured on Ray
2.60: also when the job's runtime environment equals the one Tune gives its trainables, and when
idle workers that ran tasks are there), so every Tune run starts its actors as new processes,
and their start and imports are a fixed cost of the run.
The table splits Tune's wall time into the trials' own time and Tune's (start-up, imports in the
trial actors, tear-down), and prints how long a trial must be for that fixed time to fit the target.

Part 2 (ASHA). For each of ``--seeds`` seeds, ``--asha-trials`` trials with learning rates from a
grid run twice through Tune: to the end (one FIFO run for all seeds: they do not interact), and,
per seed, under ``ASHAScheduler(metric="val_accuracy", mode="max", grace_period=G,
reduction_factor=2, max_t=epochs)`` (G = ``--asha-grace``, by default half the epochs as in
``tans search``; 1 cut the eventual winner in 3 of 5 seeds). Printed per seed: the share of
epochs ASHA saved, each run's winner (best last-reported validation accuracy, as
``ResultGrid.get_best_result(scope="last")``; ties to the lower learning rate) and whether it is
the same trial, and the regret: the full-run accuracy of the true winner minus that of ASHA's
pick. Fine-tuning is deterministic on CPU, so a trial ASHA lets finish reports the same curve as
in the full run (this is checked); ASHA's decisions depend on the order results arrive in, so
they can vary run to run.

Sized for ~6 minutes on an idle 2-core machine (``--quick``: ~2 minutes); timings on a shared
machine vary by +-30%, and the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script

FAMILY = "ofa_mbv3_tiny"
IMAGE_SIZE = 32
CLASSES = 6
CPUS_PER_TRIAL = 1
LR_GRID = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8]


def synthetic_task(n: int, seed: int):
    """``n`` 32 px images of 6 classes: class means on a small circle of colours around grey under
    strong per-pixel noise, so a few epochs reach ~0.3-0.7 and learning rates are told apart."""
    import torch

    from tans.data.reader import TaskTensors

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % CLASSES
    angle = torch.arange(CLASSES) * (2 * math.pi / CLASSES)
    spread, noise = 30.0, 70.0
    means = 128.0 + spread * torch.stack([torch.cos(angle), torch.sin(angle), -torch.cos(angle)], dim=1)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * noise + means[labels][:, :, None, None]
    return TaskTensors(images=images.clamp(0, 255).round().to(torch.uint8), labels=labels, num_classes=CLASSES)


def run_trial(config: dict, report, entered: float | None = None) -> tuple[float, float]:
    """One fine-tuning trial; ``report(metrics)`` after every epoch. Returns its (wall, CPU) seconds.

    ``entered``: ``time.time()`` when the trial function was entered, before its imports.
    """
    entered = time.time() if entered is None else entered
    import torch

    from tans.selection.finetune import build_candidate, finetune
    from tans.zoo.subnets import largest
    from tans.zoo.supernets import get_family

    t0, cpu0, started = time.perf_counter(), time.process_time(), time.time()
    torch.set_num_threads(1)
    seed = int(config["seed"])
    train = synthetic_task(config["train"], seed=1000 + seed)
    val = synthetic_task(config["val"], seed=2000 + seed)
    model = build_candidate(FAMILY, largest(get_family(FAMILY)), CLASSES, weights_uri=None, seed=seed)

    def on_epoch(epoch, metrics, _model, _optimizer):
        report({"val_accuracy": metrics["val_accuracy"], "train_loss": metrics["train_loss"],
                "epochs_done": metrics["epochs_done"], "trial_seconds": time.perf_counter() - t0,
                "trial_cpu_seconds": time.process_time() - cpu0, "pid": os.getpid(),
                "t_entered": entered, "t_started": started, "t_reported": time.time()})

    finetune(model, train, val, None, epochs=config["epochs"], batch_size=32, lr=config["lr"], seed=seed,
             on_epoch=on_epoch)
    return time.perf_counter() - t0, time.process_time() - cpu0


def tune_trial(config: dict) -> None:
    """The Ray Tune trainable: :func:`run_trial` reporting through ``ray.tune.report``."""
    entered = time.time()
    import ray.tune

    run_trial(config, ray.tune.report, entered)


def tune_run(config: dict, storage: str, name: str, num_samples: int = 1, scheduler=None):
    """``Tuner.fit()`` of :func:`tune_trial` on 1 CPU per trial; returns ``(ResultGrid, seconds)``."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune_trial, {"cpu": CPUS_PER_TRIAL}),
        param_space=config,
        # an ASHA scheduler carries the metric and mode itself (Tune refuses them twice)
        tune_config=tune.TuneConfig(metric=None if scheduler else "val_accuracy", mode=None if scheduler else "max",
                                    scheduler=scheduler, num_samples=num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    t0, cpu0, began = time.perf_counter(), time.process_time(), time.time()
    results = tuner.fit()
    seconds = time.perf_counter() - t0
    results.driver_cpu, results.began, results.ended = time.process_time() - cpu0, began, time.time()
    print(f"[bench] {name}: {len(results)} trial(s) in {seconds:.1f}s", file=sys.stderr, flush=True)
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} trial(s) failed, first: {results.errors[0]}")
    return results, seconds


def parallel_efficiency(args, storage: str, cpus: float) -> dict:
    config = {"lr": 0.2, "seed": 0, "epochs": args.epochs, "train": args.train, "val": args.val}
    at_once = min(args.trials, int(cpus // CPUS_PER_TRIAL))
    before = args.trials // 2
    runs = [run_trial(config, lambda metrics: None) for _ in range(before)]
    print(f"[bench] sequential: {before} trial(s) in {sum(r[0] for r in runs):.1f}s", file=sys.stderr, flush=True)
    results, wall = tune_run(config, storage, "parallel", num_samples=args.trials)
    runs += [run_trial(config, lambda metrics: None) for _ in range(args.trials - before)]
    sequential, sequential_cpu = [r[0] for r in runs], [r[1] for r in runs]
    ideal = sum(sequential) / at_once
    # With reuse_actors, the trials of one actor run one after another: the busiest actor's sum
    # is the makespan of the trials themselves, and the rest of the wall time is Tune's own.
    per_actor: dict[int, list[float]] = {}
    for r in results:
        wall_cpu = per_actor.setdefault(int(r.metrics["pid"]), [0.0, 0.0])
        wall_cpu[0] += r.metrics["trial_seconds"]
        wall_cpu[1] += r.metrics["trial_cpu_seconds"]
    gaps = max(0.0, wall - max(w for w, _ in per_actor.values()))
    inside_cpu = [r.metrics["trial_cpu_seconds"] for r in results]
    metrics = [r.metrics for r in results]
    where = {"start-up (fit() to the first trial's entry)": min(m["t_entered"] for m in metrics) - results.began,
             "imports in the trials (sum)": sum(m["t_started"] - m["t_entered"] for m in metrics),
             "tear-down (last report to fit()'s return)": results.ended - max(m["t_reported"] for m in metrics),
             "driver CPU seconds during fit()": results.driver_cpu}
    return {"wall": wall, "sequential": sequential, "sequential_cpu": sequential_cpu,
            "inside": [r.metrics["trial_seconds"] for r in results], "inside_cpu": inside_cpu,
            "actors": len(per_actor), "where": where, "at_once": at_once, "ideal": ideal, "ratio": wall / ideal,
            "gaps": gaps,
            "cores_sequential": sum(sequential_cpu) / sum(sequential), "cores_tune": sum(inside_cpu) / wall,
            # every trial timed by its CPU seconds (an idle machine's wall), Tune's gaps kept as measured
            "cpu_ratio": (max(c for _, c in per_actor.values()) + gaps) / (sum(sequential_cpu) / at_once)}


def _by_lr(results) -> dict[float, dict]:
    out = {}
    for r in results:
        history = r.metrics_dataframe
        out[float(r.config["lr"])] = {"epochs": int(r.metrics["epochs_done"]), "last": float(r.metrics["val_accuracy"]),
                                      "curve": [float(v) for v in history["val_accuracy"]]}
    return out


def asha_sweep(args, storage: str, seeds: list[int]) -> tuple[list[dict], float]:
    """Per seed: ASHA vs every trial to the end; returns ``(rows, wall seconds of the full run)``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    lrs = asha_lrs(args.asha_trials)
    base = {"epochs": args.asha_epochs, "train": args.train, "val": args.val}
    # Without a scheduler the seeds do not interact: one Tune run covers them all (one start-up).
    full, full_s = tune_run({**base, "lr": tune.grid_search(lrs), "seed": tune.grid_search(seeds)}, storage, "fifo")
    rows = []
    for seed in seeds:
        asha = ASHAScheduler(metric="val_accuracy", mode="max", grace_period=args.asha_grace, reduction_factor=2,
                             max_t=args.asha_epochs)
        early, early_s = tune_run({**base, "lr": tune.grid_search(lrs), "seed": seed}, storage, f"asha-{seed}",
                                  scheduler=asha)
        f, e = _by_lr([r for r in full if r.config["seed"] == seed]), _by_lr(early)
        # the winner: best last-reported validation accuracy (ResultGrid.get_best_result(scope="last"));
        # ties go to the first learning rate of the grid
        win_full = max(lrs, key=lambda lr: f[lr]["last"])
        win_asha = max(lrs, key=lambda lr: e[lr]["last"])
        same_curves = all(e[lr]["curve"] == f[lr]["curve"][: len(e[lr]["curve"])] for lr in lrs)
        rows.append({"seed": seed, "epochs_full": sum(v["epochs"] for v in f.values()),
                     "epochs_asha": sum(v["epochs"] for v in e.values()), "win_full": win_full, "win_asha": win_asha,
                     "acc_full": f[win_full]["last"], "regret": f[win_full]["last"] - f[win_asha]["last"],
                     "same_curves": same_curves, "seconds_asha": early_s,
                     "finished": sum(v["epochs"] == args.asha_epochs for v in e.values())})
    return rows, full_s


def asha_lrs(trials: int) -> list[float]:
    """``trials`` learning rates spread over :data:`LR_GRID`."""
    return LR_GRID[:: max(1, len(LR_GRID) // trials)][:trials]


def _autogroup() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (~2 minutes)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--trials", type=int, default=4, help="equal trials of part 1")
    parser.add_argument("--epochs", type=int, help="epochs per trial of part 1 [8; quick 4]")
    parser.add_argument("--train", type=int, help="training images per trial [608: ~15 s trials here; quick 96]")
    parser.add_argument("--val", type=int, help="validation images per trial [128; quick 96]")
    parser.add_argument("--asha-trials", type=int, help="trials per seed of part 2 (learning-rate grid) [8; quick 4]")
    parser.add_argument("--asha-epochs", type=int, default=4, help="epochs per trial of part 2 (ASHA's max_t) [4]")
    parser.add_argument("--asha-grace", type=int, help="ASHA's grace_period in epochs [half of --asha-epochs, "
                        "as tans search]")
    parser.add_argument("--seeds", type=int, help="seeds of part 2 (0: part 1 only) [5; quick 2]")
    parser.add_argument("--ray-niceness", action="store_true", help="keep Ray's worker niceness (15)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.epochs = args.epochs or (4 if quick else 8)
    args.train = args.train or (96 if quick else 608)
    args.val = args.val or (96 if quick else 128)
    args.asha_trials = args.asha_trials or (4 if quick else 8)
    args.seeds = (2 if quick else 5) if args.seeds is None else args.seeds
    args.asha_grace = args.asha_grace or max(1, args.asha_epochs // 2)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # listeners on 127.0.0.1; read when ray is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if not args.ray_niceness:
        os.environ["RAY_worker_niceness"] = str(  # noqa: SIM112 (Ray spells it so)
            os.getpriority(os.PRIO_PROCESS, 0))
    import torch

    torch.set_num_threads(1)
    import ray

    t_start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        cpus = float(ray.cluster_resources().get("CPU", args.cpus))
        with tempfile.TemporaryDirectory(prefix="tans-bench-tune-") as storage:
            load_before = os.getloadavg()[0]
            p = parallel_efficiency(args, storage, cpus)
            sweep, full_s = asha_sweep(args, storage, list(range(args.seeds))) if args.seeds else ([], 0.0)
            load_after = os.getloadavg()[0]
    finally:
        ray.shutdown()
    total = time.perf_counter() - t_start

    print(f"\n{FAMILY} largest subnet, {IMAGE_SIZE}px, {args.train} train / {args.val} val synthetic images, "
          f"batch 32, 1 thread per trial; Ray with {cpus:g} CPUs, 1 CPU per trial, reuse_actors=True, "
          f"worker niceness {'15 (Ray default)' if args.ray_niceness else os.environ['RAY_worker_niceness']}")  # noqa: SIM112
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after; whole bench {total:.0f}s\n")
    print(f"part 1: {args.trials} equal trials x {args.epochs} epochs, {p['at_once']} at once")
    print("| measure | seconds |")
    print("| --- | --- |")
    print(f"| sequential in-process, per trial (median of {len(p['sequential'])}) | "
          f"{statistics.median(p['sequential']):.1f} "
          f"(min {min(p['sequential']):.1f}, max {max(p['sequential']):.1f}) |")
    print(f"| sum of sequential / {p['at_once']} (ideal) | {p['ideal']:.1f} |")
    print(f"| inside Tune, per trial (median of {len(p['inside'])}; {p['actors']} trial actor(s)) | "
          f"{statistics.median(p['inside']):.1f} (min {min(p['inside']):.1f}, max {max(p['inside']):.1f}) |")
    print(f"| CPU seconds per trial: in-process / inside Tune (medians) | "
          f"{statistics.median(p['sequential_cpu']):.1f} / {statistics.median(p['inside_cpu']):.1f} |")
    print(f"| Tuner.fit() wall | {p['wall']:.1f} |")
    print(f"| ... of which outside the trials (actor start, imports, scheduling, results) | {p['gaps']:.1f} |")
    for what, secs in p["where"].items():
        print(f"| ... {what} | {secs:.1f} |")
    print(f"| cores the trials got: in-process / in Tune (CPU seconds / wall) | "
          f"{p['cores_sequential']:.2f} / {p['cores_tune']:.2f} |")
    print(f"\nTune's fixed cost per run (Tuner.fit() wall minus the busiest trial actor's trials) = {p['gaps']:.1f}s "
          f"(target <= 3 s: {'met' if p['gaps'] <= 3 else 'missed'})")
    print(f"ratio Tune wall / ideal = {p['ratio']:.3f}  (target <= 1.15 with ~15 s trials; "
          f"trials here {statistics.median(p['sequential']):.0f}s)")
    print(f"the same ratio with each trial timed by its CPU seconds (Tune's own time kept as measured): "
          f"{p['cpu_ratio']:.3f}")
    trials_only = (p["wall"] - p["gaps"]) / p["ideal"]  # the ratio without Tune's own time
    if trials_only < 1.15:
        need = p["gaps"] / (1.15 - trials_only) * p["at_once"] / args.trials
        now = statistics.median(p["sequential"])
        print(f"Tune's own time ({p['gaps']:.1f}s per run) is fixed: the trials alone give {trials_only:.3f}, and the "
              f"ratio reaches 1.15 once each trial takes >= {need:.0f}s (now {now:.0f}s)")
    if max(load_before, load_after) > 1.5 * cpus:
        print(f"note: the load average exceeded the {cpus:g} CPUs: other processes competed for the cores, so the "
              "wall ratio measures the machine's load as much as Tune"
              + (" (and CFS autogroup shares CPU per session: all of this run's processes share one session's share)"
                 if _autogroup() else ""))
    print()
    if not sweep:
        return 0 if p["ratio"] <= 1.15 else 1

    print(f"part 2: ASHA (grace {args.asha_grace}, reduction 2, max_t {args.asha_epochs}) vs all trials to the end; "
          f"{len(asha_lrs(args.asha_trials))} learning rates per seed")
    print("| seed | epochs full | epochs ASHA | saved | finished | winner full (acc) | winner ASHA | same | regret | "
          "curves match | s ASHA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sweep:
        saved = 1 - r["epochs_asha"] / r["epochs_full"]
        print(f"| {r['seed']} | {r['epochs_full']} | {r['epochs_asha']} | {saved:.0%} | {r['finished']} | "
              f"lr {r['win_full']:g} ({r['acc_full']:.3f}) | lr {r['win_asha']:g} | "
              f"{'yes' if r['win_full'] == r['win_asha'] else 'no'} | {r['regret']:.3f} | "
              f"{'yes' if r['same_curves'] else 'no'} | {r['seconds_asha']:.0f} |")
    saved_all = 1 - sum(r["epochs_asha"] for r in sweep) / sum(r["epochs_full"] for r in sweep)
    same = sum(r["win_full"] == r["win_asha"] for r in sweep)
    print(f"\nASHA saved {saved_all:.0%} of the epochs; same winner in {same}/{len(sweep)} seeds; "
          f"mean regret {statistics.mean(r['regret'] for r in sweep):.3f}; "
          f"wall {sum(r['seconds_asha'] for r in sweep):.0f}s ({len(sweep)} runs) vs {full_s:.0f}s (one run)")
    return 0 if p["ratio"] <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
