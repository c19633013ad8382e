"""Pretrain a zoo's base supernet on the pooled meta_train tasks (Ray Train, DDP, sandwich rule).

    python -m jobs.pretrain_supernet --config configs/zoo/local.yaml [--force] [key=value ...]

Every task keeps its own class range in one big head (task i's labels are offset by the classes
of the tasks before it), and a seeded subset of ``pretrain.images_per_task`` images per task is
pooled. A ``TorchTrainer`` runs ``pretrain.num_workers`` DDP workers (gloo on CPU, nccl on GPU);
each decodes the pooled tensors and trains on its ``rank::world_size`` shard. That sharded
reader is used rather than Ray Data's ``streaming_split`` because the pooled subset is small
(megabytes) and a worker that owns all of a node's CPUs would starve Ray Data's read tasks.

After every epoch a checkpoint (``model.pt``, ``optimizer.pt``, ``state.json``) goes to
``<root>/supernets/<zoo>/base/ray_train/``; a worker failure, or a re-run of the job, resumes from
the latest one and never repeats a finished epoch. At the end the driver writes ``model.pt`` and
then ``done.json`` (last) under ``<root>/supernets/<zoo>/base/``; a finished base is reused
unless ``force=true``. Curves for TensorBoard go to ``<root>/supernets/<zoo>/base/tb/``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from jobs._common import as_override, drain_progress, run_main, split_overrides
from tans import paths
from tans.config import ConfigError, to_dict
from tans.data.reader import TaskTensors, decode_images
from tans.data.tasks import read_split, read_task_info
from tans.job_configs import ZooConfig, load_job_config, load_splits
from tans.storage import Storage, new_generation
from tans.zoo.store import ZooError

RUN_NAME = "pretrain"  # fixed, so a re-run finds (and resumes) the same Ray Train run
# Test hooks (read by the driver, handed to the workers): rank 0 appends every epoch it starts
# to <dir>/epochs.txt; with FAIL_ONCE_AT_EPOCH the worker process dies once in that epoch.
TRACE_DIR_ENV = "TANS_PRETRAIN_TRACE_DIR"
FAIL_AT_EPOCH_ENV = "TANS_PRETRAIN_FAIL_ONCE_AT_EPOCH"


def base_dir(zoo: str) -> str:
    """Where a zoo's base supernet lives, relative to the storage root."""
    return paths.base_dir(zoo)


# -- data ------------------------------------------------------------------------------------


@dataclass
class PooledLayout:
    """How the tasks share the head: ``offsets[task]`` is the task's first class index."""

    tasks: list[str]
    offsets: dict[str, int]
    num_classes: int
    images: dict[str, int]  # images taken per task

    @classmethod
    def of(cls, storage: Storage, tasks: list[str], images_per_task: int) -> PooledLayout:
        offsets, images, total = {}, {}, 0
        for task in tasks:
            info = read_task_info(storage, task)  # TaskError if the task is not in the root
            offsets[task], total = total, total + info.num_classes
            images[task] = min(images_per_task, int(info.counts.get("train", 0)))
        return cls(list(tasks), offsets, total, images)


def subset_indices(task: str, n: int, k: int, seed: int) -> np.ndarray:
    """A seeded, sorted choice of ``k`` of ``n`` rows; independent of the other tasks."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def load_pooled(storage: Storage, layout: PooledLayout, image_size: int, seed: int) -> TaskTensors:
    """Decode the seeded subset of every task's train split, labels offset into one range."""
    images, labels = [], []
    for task in layout.tasks:
        table = read_split(storage, task, "train")
        idx = subset_indices(task, table.num_rows, layout.images[task], seed)
        table = table.take(idx)
        images.append(decode_images(table.column("image").to_pylist(), image_size, channels=3))
        labels.append(torch.tensor(table.column("label").to_pylist(), dtype=torch.int64) + layout.offsets[task])
    return TaskTensors(torch.cat(images), torch.cat(labels), layout.num_classes)


# -- the per-worker training loop ----------------------------------------------------------


def prepare_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Move to this worker's device and wrap in DDP (world size > 1).

    ``find_unused_parameters``: a smaller subnet leaves whole blocks (and kernel transforms)
    out of its graph, and every rank samples the same subnet, so the unused sets agree.
    """
    import ray.train
    import ray.train.torch

    multi = ray.train.get_context().get_world_size() > 1
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": multi})


def train_loop(config: dict) -> None:
    """One Ray Train worker: resume or initialise, then sandwich-rule epochs with checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    from tans.zoo.elastic import make_optimizer, train_supernet
    from tans.zoo.supernets import get_family, unwrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    layout: PooledLayout = config["layout"]
    data = load_pooled(Storage(config["root"]), layout, config["image_size"], config["seed"])
    family = get_family(config["family"])
    torch.manual_seed(config["seed"])
    model = family.build(layout.num_classes)

    checkpoint = ray.train.get_checkpoint()
    state = {"epochs_done": 0, "step": 0, "history": []}
    optimizer_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
            # (load_state_dict moves the momentum buffers to the parameters' device)
            optimizer_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
    elif config["init_ref"] is not None:
        model.load_state_dict(ray.get(config["init_ref"]))

    model = prepare_ddp(model)
    device = ray.train.torch.get_device()
    # Made after prepare_ddp, so a restored momentum buffer lands on the parameters' device.
    optimizer = make_optimizer(unwrap(model), config["lr"], config["momentum"], config["weight_decay"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    batch = config["batch_per_worker"]
    per_epoch = (len(data) // world) // batch  # the same on every rank: DDP steps in lock-step
    epochs = config["epochs"]
    writer = _tb_writer(config, rank, purge_step=state["step"] or None)
    trace, fail_at = config["trace_dir"], config["fail_at_epoch"]
    epoch_losses: list[float] = []
    clock = {"t0": time.perf_counter(), "lr": 0.0}

    def log(step: int, info: dict) -> None:
        epoch = info["epoch"]
        if rank == 0 and trace and not epoch_losses:
            with open(os.path.join(trace, "epochs.txt"), "a") as f:
                f.write(f"{epoch}\n")
        epoch_losses.append(info["loss"])
        clock["lr"] = info["lr"]
        if writer is not None:
            writer.add_scalar("train/loss", info["loss"], step)
            writer.add_scalar("train/lr", info["lr"], step)
        if rank == 0 and epoch == fail_at and len(epoch_losses) == max(1, per_epoch // 2):
            _fail_once(trace)

    def on_epoch_end(epoch: int, step: int) -> None:
        nonlocal state
        seconds = time.perf_counter() - clock["t0"]
        loss = _global_mean(sum(epoch_losses) / max(len(epoch_losses), 1), world, device)
        metrics = {"epoch": epoch, "step": step, "loss": loss, "lr": clock["lr"], "epoch_s": seconds,
                   "images_per_s": len(epoch_losses) * batch * world / seconds}
        state = {"epochs_done": epoch + 1, "epoch": epoch, "step": step, "history": [*state["history"], metrics]}
        if writer is not None:
            writer.add_scalar("epoch/loss", loss, epoch)
            writer.add_scalar("epoch/images_per_s", metrics["images_per_s"], epoch)
            writer.flush()
            _upload_tb(config, writer)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                # CPU tensors: the driver (and the zoo's workers) may have no GPU.
                cpu_state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
                torch.save(cpu_state, os.path.join(tmp, "model.pt"))
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(state, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0 and config["progress"] is not None:
            config["progress"].put({**metrics, "eta_s": seconds * (epochs - epoch - 1), "epochs": epochs})
        epoch_losses.clear()
        clock["t0"] = time.perf_counter()

    # Resumes at the step after the last finished epoch: those epochs are never run again.
    train_supernet(model, data, family, steps=epochs * per_epoch, batch_size=batch, lr=config["lr"],
                   seed=config["seed"], random_subnets=config["random_subnets"], rank=rank, world_size=world,
                   start_step=state["step"], on_epoch_end=on_epoch_end, log=log, optimizer=optimizer,
                   precision=config.get("precision", "fp32"),
                   warmup_steps=round(config.get("warmup_epochs", 0.0) * per_epoch))
    if writer is not None:
        writer.close()
        _upload_tb(config, writer)


def _global_mean(value: float, world: int, device) -> float:
    if world == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item() / world)


def _tb_writer(config: dict, rank: int, purge_step: int | None):
    """Rank 0's SummaryWriter: straight into a local root, else a local dir uploaded per epoch."""
    if rank != 0:
        return None
    from tensorboardX import SummaryWriter

    storage = Storage(config["root"])
    logdir = storage.path(config["tb_rel"]) if storage.is_local else tempfile.mkdtemp(prefix="tans-tb-")
    return SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30)


def _upload_tb(config: dict, writer) -> None:
    storage = Storage(config["root"])
    if storage.is_local:
        return
    logdir = writer.logdir
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name), "rb") as f:
            storage.write_bytes(f"{config['tb_rel']}/{name}", f.read())


def _fail_once(trace_dir: str) -> None:
    """Test hook: kill this worker process once (a marker file keeps the retry alive)."""
    marker = os.path.join(trace_dir, "failed")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    _wait_for_reported_checkpoint()
    os._exit(1)


def _wait_for_reported_checkpoint(timeout_s: float = 30.0) -> None:
    # The last epoch's report sits in this worker's result queue until the controller polls it;
    # dying before then would lose that checkpoint. Ray-internal, so only the test hook uses it.
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
        deadline = time.monotonic() + timeout_s
        while not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    except Exception:  # another Ray version: fall back to a generous wait
        time.sleep(5.0)


# -- the driver ------------------------------------------------------------------------------


def _reuse_finished(cfg: ZooConfig, storage: Storage, tasks: list[str], base: str) -> str:
    """The finished base's model path, after checking it was trained for this zoo."""
    done = storage.read_json(f"{base}/done.json")
    # Other epochs or lr: finished is finished. Another body, input size or head: not the same base.
    for key, want in (("family", cfg.family), ("image_size", cfg.image_size), ("tasks", list(tasks))):
        if done.get(key) != want:
            raise ZooError(f"the base supernet of zoo {cfg.name!r} was trained with {key}={done.get(key)!r}, "
                           f"not {want!r}: pick another zoo name or use --force")
    model_rel = done.get("model") or f"{base}/model.pt"
    print(f"[pretrain] reusing the finished base supernet {storage.uri_of(model_rel)}")
    return model_rel


def _save_final(cfg: ZooConfig, storage: Storage, result, model_rel: str) -> dict:
    """Copy the last checkpoint's weights to ``model_rel``; returns the run's state (history)."""
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining of {cfg.name!r} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state_dict = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(model_rel, buf.getvalue())
    return state


# Options added after bases were recorded, at the values those bases were trained with.
_ADDED_LATER = {("precision", "fp32"), ("warmup_epochs", 0.0)}


def weight_settings(p) -> dict:
    """The pretraining settings the base's weights depend on, for its fingerprint.

    ``max_failures`` is left out (a retry changes nothing), and so is an option added later when
    it has the value older bases were trained with: a base recorded before it still resumes.
    """
    return {k: v for k, v in to_dict(p).items() if k != "max_failures" and (k, v) not in _ADDED_LATER}


def pretrain_base(cfg: ZooConfig, storage: Storage, tasks: list[str], base: str = "") -> str:
    """Pretrain (or reuse) the base supernet of zoo ``cfg.name`` on ``tasks`` (meta_train).

    Returns the path of the final state dict relative to the storage root
    (``supernets/<zoo>/base/model.pt``). A finished run (its ``done.json`` exists) is reused
    unless ``cfg.force``; an unfinished one with the same settings resumes from its last epoch.
    User mistakes (a task missing from the root, a task outside meta_train, an unknown family,
    an unreadable init checkpoint) raise one-line errors before any worker starts.
    """
    from tans.zoo.supernets import get_family

    base = base or base_dir(cfg.name)  # build-zoo --force passes its generation's own base folder
    done_rel = f"{base}/done.json"
    if storage.is_file(done_rel) and not cfg.force:
        return _reuse_finished(cfg, storage, tasks, base)

    p = cfg.pretrain
    splits = load_splits(cfg.splits)
    _check_tasks(tasks, splits, cfg.splits)
    family = get_family(cfg.family)  # SupernetError for an unknown family
    layout = PooledLayout.of(storage, list(tasks), p.images_per_task)
    batch_per_worker = max(2, p.batch_size // p.num_workers)  # batch_size is the global batch
    pooled = sum(layout.images.values())
    if (pooled // p.num_workers) // batch_per_worker < 1:
        raise ConfigError(
            f"pretrain.batch_size: {pooled} pooled images make no full batch of {batch_per_worker} per worker "
            f"on {p.num_workers} worker(s) (lower batch_size or raise images_per_task)"
        )
    init_state = _initial_state(family, layout.num_classes, p.init)

    # What the weights depend on; a leftover run with other settings cannot be resumed.
    fingerprint = {"family": cfg.family, "image_size": cfg.image_size, "seed": cfg.seed, "tasks": list(tasks),
                   "pretrain": weight_settings(p)}
    out = _attempt_dir(storage, base, fingerprint, finished=storage.is_file(done_rel))
    model_rel = f"{out}/model.pt"

    from jobs import runtime

    ray = runtime.init_ray()
    from ray.util.queue import Queue

    progress = Queue(actor_options={"num_cpus": 0})
    trace_dir = os.environ.get(TRACE_DIR_ENV, "")
    fail_at = os.environ.get(FAIL_AT_EPOCH_ENV, "")
    config = {
        "root": storage.uri, "layout": layout, "family": cfg.family, "image_size": cfg.image_size,
        "seed": cfg.seed, "epochs": p.epochs, "batch_per_worker": batch_per_worker, "lr": p.lr,
        "momentum": p.momentum, "weight_decay": p.weight_decay, "random_subnets": p.random_subnets,
        "init_ref": ray.put(init_state) if init_state is not None else None, "tb_rel": f"{out}/tb",
        "progress": progress, "trace_dir": trace_dir, "fail_at_epoch": int(fail_at) if fail_at and trace_dir else -1,
        "precision": p.precision, "warmup_epochs": p.warmup_epochs,
    }
    print(f"[pretrain] {cfg.name}: {family.name} at {cfg.image_size}px on {len(tasks)} tasks, {pooled} images, "
          f"{layout.num_classes} classes; {p.epochs} epochs on {p.num_workers} worker(s) -> {storage.uri_of(base)}")
    t0 = time.perf_counter()
    printer = threading.Thread(target=drain_progress, args=(progress, _progress_line), daemon=True)
    printer.start()
    try:
        result = _trainer(cfg, storage, config, out).fit()
    finally:
        progress.put(None)
        printer.join(timeout=10)
        progress.shutdown()
    state = _save_final(cfg, storage, result, model_rel)
    storage.write_json(
        done_rel,
        {
            "zoo": cfg.name,
            "family": cfg.family,
            "image_size": cfg.image_size,
            "config": to_dict(cfg),
            "splits_hash": splits.digest(),
            "tasks": list(tasks),
            "class_offsets": layout.offsets,
            "num_classes": layout.num_classes,
            "images": pooled,
            "metrics": state["history"][-1] if state["history"] else {},
            "history": state["history"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "model": model_rel,
            "ray_train": storage.uri_of(f"{out}/ray_train/{RUN_NAME}"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )  # written last: it marks the base as finished (and, after --force, swaps the new one in)
    _drop_stale(storage, base, out)
    print(f"[pretrain] done in {time.perf_counter() - t0:.0f}s -> {storage.uri_of(model_rel)}")
    return model_rel


# What one attempt writes: in base/ for a first build, in base/g-<id>/ for a forced rebuild.
ATTEMPT_FILES = ("model.pt", "ray_train", "tb")


def _attempt_dir(storage: Storage, base: str, fingerprint: dict, finished: bool) -> str:
    """The folder this attempt trains into; records it with the fingerprint in ``run.json``.

    A finished base is never touched: ``--force`` trains a generation ``base/g-<id>/`` beside it,
    and only the new ``done.json`` (written last, atomically) makes it the base. An unfinished
    attempt with the same settings resumes in its folder; one with other settings starts over.
    """
    run_rel = f"{base}/run.json"
    previous = storage.read_json(run_rel) if storage.is_file(run_rel) else None
    same = previous is not None and {k: v for k, v in previous.items() if k != "attempt"} == fingerprint
    out = previous.get("attempt", base) if same else base
    live = (
        posixpath.dirname(storage.read_json(f"{base}/done.json").get("model", f"{base}/model.pt"))
        if finished
        else None
    )
    if out == live:
        out = f"{base}/{new_generation()}"  # never train into the folder a finished done.json names
    if not same:
        if previous is not None:
            print("[pretrain] an unfinished run with other settings exists: starting over")
        storage.delete(f"{out}/ray_train")
        storage.delete(f"{out}/tb")
    storage.write_json(run_rel, {**fingerprint, "attempt": out})
    return out


def _drop_stale(storage: Storage, base: str, out: str) -> None:
    """After the swap: delete the generations and top-level files the new ``done.json`` does not name."""
    for entry in storage.list(base):
        name = entry.rsplit("/", 1)[-1]
        if (name.startswith("g-") and entry != out) or (out != base and name in ATTEMPT_FILES):
            storage.delete(entry)


def _check_tasks(tasks: list[str], splits, splits_path: str) -> None:
    if not tasks:
        raise ConfigError("pretrain_tasks: no tasks to pretrain the base supernet on")
    held_out = {t: "meta_val" for t in splits.meta_val} | {t: "meta_test" for t in splits.meta_test}
    for t in tasks:
        if t in held_out:
            raise ConfigError(f"pretrain_tasks: task {t!r} is {held_out[t]} in {splits_path}; base pretraining uses "
                              "meta_train tasks only")


def _initial_state(family, num_classes: int, init: str) -> dict | None:
    """The state dict to start from (``pretrain.init``), loaded here so a bad one fails early."""
    if not init:
        return None
    from tans.zoo.supernets import load_initial_weights

    model = family.build(num_classes)
    load_initial_weights(model, init)  # SupernetError / StorageError on an unreadable checkpoint
    return model.state_dict()


def _trainer(cfg: ZooConfig, storage: Storage, config: dict, out: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    p = cfg.pretrain
    run_config = RunConfig(
        name=RUN_NAME,
        storage_path=storage.path(f"{out}/ray_train"),
        storage_filesystem=None if storage.is_local else storage.fs,
        failure_config=FailureConfig(max_failures=p.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                     resources_per_worker={"CPU": p.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        run_config=run_config,
    )


def _progress_line(msg: dict) -> str:
    return (f"[pretrain] epoch {msg['epoch'] + 1}/{msg['epochs']}  loss {msg['loss']:.4f}  lr {msg['lr']:.4f}  "
            f"{msg['images_per_s']:.0f} images/s  {msg['epoch_s']:.0f}s  ETA {msg['eta_s']:.0f}s")


# -- command line --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain_supernet", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="zoo config YAML (default: configs/zoo/local.yaml)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--force", action="store_true", help="retrain even if a finished base exists")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    overrides += ([as_override("root", args.root)] if args.root else []) + (["force=true"] if args.force else [])
    cfg: ZooConfig = load_job_config("zoo", args.config, overrides)
    storage = Storage(cfg.root or None)
    tasks = list(cfg.pretrain_tasks) or list(load_splits(cfg.splits).meta_train)
    rel = pretrain_base(cfg, storage, tasks)
    print(storage.uri_of(rel))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
