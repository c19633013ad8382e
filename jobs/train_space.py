"""Train the cross-modal space on a zoo (Ray Train), then write its index, metrics and plot.

    python -m jobs.train_space --config configs/space/local.yaml [--force] [key=value ...]
    tans train-space ...   (the same)

1. Query features for the zoo's meta_train and meta_val tasks (``jobs.extract_queries``, Ray Data).
2. A ``TorchTrainer`` (``num_workers`` DDP workers; one is fine locally) trains the query
   encoder, model encoder and predictor with the hard-negative contrastive loss + MSE on the
   meta_train tasks only: neither the meta_val tasks' queries nor their zoo rows are trained on.
   Every ``eval_every`` steps rank 0 scores the meta_val queries against the full index and
   reports a checkpoint; an interrupted run resumes from its latest checkpoint.
3. The checkpoint with the best meta_val score becomes ``model.pt``; the whole zoo is embedded
   into ``index.parquet``; ``metrics.json`` (val metrics next to the random and size baselines,
   curves), ``curves.png`` and ``tb/`` are written; ``space.json`` last, then ``spaces/LATEST``.

A finished run (its ``space.json`` exists) is reused unless ``force=true``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

from jobs._common import as_override, drain_progress, run_main, split_overrides
from tans.config import to_dict
from tans.job_configs import SpaceConfig, load_job_config, load_splits
from tans.storage import Storage

RUN_NAME = "train"  # fixed, so a re-run finds (and resumes) the same Ray Train run
KS = (1, 5, 10)


# -- the per-worker training loop ----------------------------------------------------------


def _load_inputs(root: str, zoo: str, extractor: str, train: list[str], val: list[str],
                 extra: list[str] | None = None):
    """(every zoo row with its task features, task -> stored query) for train, val and ``extra`` tasks."""
    from tans.space.features import read_query
    from tans.space.training import ZooArrays
    from tans.zoo.store import read_zoo

    storage = Storage(root)
    queries = {t: read_query(storage, extractor, t) for t in dict.fromkeys([*train, *val, *(extra or [])])}
    # every row carries its task's mean query feature (used only by a task-features space)
    zoo_all = ZooArrays.from_table(read_zoo(storage, zoo)).with_task_features(queries)
    return zoo_all, queries


def _train_subset(zoo_all, tasks: list[str]):
    """The zoo rows of ``tasks`` only: what the training loop may see."""
    return zoo_all.subset(zoo_all.rows_of(tasks))


def _transfer_pairs(transfer_cfg: dict, zoo_all, zoo_train):
    """The transfer records' predictor pairs on the training rows (tans.space.transfer)."""
    from tans.space.transfer import transfer_pairs

    return transfer_pairs(transfer_cfg["records"], zoo_all.model_ids, zoo_train.model_ids,
                          set(transfer_cfg["meta_train"]))


def _transfer_config(cfg: SpaceConfig, storage: Storage, splits, train: list[str]) -> dict | None:
    """The training loop's ``transfer`` entry: the runs' records cut to what the pairs need, checked
    here in the driver (a bad run is one line before any worker starts); None without transfer_runs."""
    if not cfg.transfer_runs:
        return None
    from tans.space.training import ZooArrays
    from tans.space.transfer import read_transfer_records
    from tans.zoo.store import read_zoo

    records = [{"task": r.get("task"), "ground_truth": {m: {"test_accuracy": v.get("test_accuracy")}
                                                         for m, v in (r.get("ground_truth") or {}).items()}}
               for r in read_transfer_records(storage, cfg.transfer_runs)]
    out = {"records": records, "meta_train": list(splits.meta_train), "weight": cfg.transfer_weight}
    zoo_all = ZooArrays.from_table(read_zoo(storage, cfg.zoo))
    pairs = _transfer_pairs(out, zoo_all, _train_subset(zoo_all, train))
    if not len(pairs):
        from tans.space.encoders import SpaceError

        raise SpaceError(f"transfer_runs {cfg.transfer_runs}: no fine-tune of a meta_train zoo model in their records")
    print(f"[space] transfer: {len(pairs)} pairs (zoo model fine-tuned on another task) from {len(records)} "
          f"records of {len(pairs.tasks)} meta_train targets in {', '.join(cfg.transfer_runs)}", flush=True)
    return {**out, "tasks": pairs.tasks}


def _transfer_info(cfg: SpaceConfig, transfer: dict | None) -> dict | None:
    """space.json's ``transfer``: which runs and targets taught the predictor (None: none did)."""
    return {"runs": cfg.transfer_runs, "tasks": transfer["tasks"], "weight": cfg.transfer_weight} if transfer else None


def train_loop(config: dict) -> None:
    """One Ray Train worker: resume or start, train, evaluate on meta-val, checkpoint."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from tans.space.store import build_space_model
    from tans.space.training import evaluate_space, selection_score, train_step

    torch.set_num_threads(max(1, config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train, val = config["train_tasks"], config["val_tasks"]
    transfer_cfg = config.get("transfer")
    zoo_all, queries = _load_inputs(config["root"], config["zoo"], config["extractor"], train, val,
                                    transfer_cfg["tasks"] if transfer_cfg else [])
    zoo_train = _train_subset(zoo_all, train)
    transfer = _transfer_pairs(transfer_cfg, zoo_all, zoo_train) if transfer_cfg else None
    train_queries = {t: queries[t] for t in (transfer.tasks if transfer else [])}
    train_queries.update({t: queries[t] for t in train})
    val_queries = {t: queries[t] for t in val}

    torch.manual_seed(config["seed"])
    model = build_space_model(config["info"])
    state = {"step": 0, "history": []}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True))
            optimizer_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    inner = getattr(model, "module", model)
    optimizer = torch.optim.Adam(inner.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    from jobs.pretrain_supernet import _tb_writer, _upload_tb

    writer = _tb_writer(config, rank, purge_step=state["step"] or None)
    steps, every = config["steps"], config["eval_every"]
    losses: list[dict] = []
    t0 = time.perf_counter()
    for step in range(state["step"], steps):
        # Every rank draws the same task batch, then takes its shard: negatives stay within a rank.
        shared = np.random.default_rng([config["seed"], step])
        batch = list(train)
        if config["tasks_per_step"] and config["tasks_per_step"] < len(batch):
            batch = [batch[i] for i in sorted(shared.choice(len(batch), config["tasks_per_step"], replace=False))]
        mine = batch[rank::world] if world > 1 else batch
        gen = np.random.default_rng([config["seed"], step, rank])
        parts = train_step(model, optimizer, zoo_train, train_queries, mine, config["per_class"], gen,
                           lam=config["lam"], margin=config["margin"], device=device, transfer=transfer,
                           transfer_weight=transfer_cfg["weight"] if transfer_cfg else 0.0)
        losses.append(parts)
        if writer is not None:
            for k, v in parts.items():
                writer.add_scalar(f"train/{k}", v, step + 1)
        if (step + 1) % every and step + 1 != steps:
            continue
        metrics = {"step": step + 1, **{k: float(np.mean([p[k] for p in losses])) for k in losses[0]}}
        losses.clear()
        if rank == 0:
            val_m = evaluate_space(inner, zoo_all, val_queries)
            metrics.update(
                {k: val_m[k] for k in ("R@1", "R@5", "R@10", "mean_rank", "median_rank", "rmse", "kendall_tau")}
            )
            metrics["select"] = selection_score(val_m)
            metrics["seconds"] = time.perf_counter() - t0
            if writer is not None:
                for k in ("R@1", "R@5", "R@10", "mean_rank", "rmse", "kendall_tau"):
                    writer.add_scalar(f"val/{k}", metrics[k], step + 1)
                writer.flush()
                _upload_tb(config, writer)
            if config["progress"] is not None:
                config["progress"].put({**metrics, "steps": steps})
        state = {"step": step + 1, "history": [*state["history"], metrics]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({k: v.detach().cpu() for k, v in inner.state_dict().items()}, os.path.join(tmp, "model.pt"))
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(state, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    if writer is not None:
        writer.close()
        _upload_tb(config, writer)


def _progress_line(m: dict) -> str:
    return (f"[space] step {m['step']}/{m['steps']}  loss {m['loss']:.4f}  val R@1 {m['R@1']:.2f}  "
            f"R@5 {m['R@5']:.2f}  mean rank {m['mean_rank']:.1f}  tau {m['kendall_tau']:.3f}  {m['seconds']:.0f}s")


def _trainer(cfg: SpaceConfig, storage: Storage, config: dict, out_dir: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_config = RunConfig(
        name=RUN_NAME,
        storage_path=storage.path(f"{out_dir}/ray_train"),
        storage_filesystem=None if storage.is_local else storage.fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # every evaluation is kept (a few MB each): the best one on meta-val is chosen at the end
        checkpoint_config=CheckpointConfig(num_to_keep=None),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=run_config,
    )


# -- the driver ------------------------------------------------------------------------------


def _best_checkpoint(result):
    """(checkpoint, metrics) of the report with the best meta-val selection score."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "select" in m]
    if not scored:
        raise RuntimeError("space training ended without an evaluated checkpoint")
    # max by score; on a tie the earlier step (fewer steps, less chance of overfitting)
    return max(scored, key=lambda cm: (cm[1]["select"], -cm[1]["step"]))


def plot_curves(history: list[dict], baselines: dict, path: str) -> None:
    """curves.png: training loss, and val R@k next to the random baseline, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("loss", "contrastive", "mse"):
        ax1.plot(steps, [h[key] for h in history], label=key)
    ax1.set_xlabel("step"), ax1.set_title("training loss (meta-train)"), ax1.legend()
    for k, color in zip(KS, ("C0", "C1", "C2")):
        ax2.plot(steps, [h[f"R@{k}"] for h in history], color=color, label=f"R@{k}")
        ax2.axhline(baselines["random"][f"R@{k}"], color=color, ls=":", lw=1)
    ax2.set_ylim(-0.05, 1.05), ax2.set_xlabel("step"), ax2.set_title("meta-val recall (dotted: random)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(val: dict) -> str:
    rnd, size = val["baselines"]["random"], val["baselines"]["size"]
    rows = [("R@1", val["R@1"], rnd["R@1"], None), ("R@5", val["R@5"], rnd["R@5"], None),
            ("R@10", val["R@10"], rnd["R@10"], None), ("mean rank", val["mean_rank"], rnd["mean_rank"], None),
            ("median rank", val["median_rank"], rnd["median_rank"], None),
            ("Kendall tau", val["kendall_tau"], None, size["kendall_tau"]), ("RMSE", val["rmse"], None, None)]
    lines = [f"{'meta-val':<12} {'space':>8} {'random':>8} {'size':>8}"]
    for name, v, r, s in rows:
        def cell(x):
            return f"{x:8.3f}" if x is not None else f"{'':>8}"
        lines.append(f"{name:<12} {cell(v)} {cell(r)} {cell(s)}")
    return "\n".join(lines)


def _files_for_run(cfg: SpaceConfig, storage: Storage, finished: bool) -> tuple[str, str]:
    """(generation, folder) this attempt writes to; records its fingerprint in ``run.json``.

    A finished run is never touched: ``--force`` builds a new generation ``g-<id>/`` beside it
    (tans.space.store, "build beside, then swap"); an unfinished attempt with the same settings (and
    generation) resumes from its Ray Train checkpoints; one with other settings starts over.
    """
    from tans.space.store import files_dir, new_generation, space_dir

    run_dir = space_dir(cfg.name)
    fingerprint = {k: v for k, v in to_dict(cfg).items() if k not in ("force", "max_failures", "root")}
    previous = storage.read_json(f"{run_dir}/run.json") if storage.is_file(f"{run_dir}/run.json") else None
    same = previous is not None and {k: v for k, v in previous.items() if k != "generation"} == fingerprint
    files = previous.get("generation", "") if same else ""
    live = storage.read_json(f"{run_dir}/space.json").get("files", "") if finished else None
    if files == live:
        files = new_generation()  # never write into the files a finished space.json names
    out_dir = files_dir(cfg.name, files)
    if not same:
        if previous is not None:
            print("[space] an unfinished run with other settings exists: starting over")
        storage.delete(f"{out_dir}/ray_train")
        storage.delete(f"{out_dir}/tb")
    storage.write_json(f"{run_dir}/run.json", {**fingerprint, "generation": files})
    return files, out_dir


def train_space(cfg: SpaceConfig, storage: Storage) -> str:
    """Train (or reuse) the space ``cfg.name``; returns its URI."""
    from tans.space.store import files_dir, read_space_info, space_dir

    run_dir = space_dir(cfg.name)
    finished = storage.is_file(f"{run_dir}/space.json")
    if finished and not cfg.force:
        info = read_space_info(storage, cfg.name)
        if info.get("zoo") != cfg.zoo:
            from tans.zoo.store import ZooError

            raise ZooError(f"space {cfg.name!r} was trained on zoo {info.get('zoo')!r}, not {cfg.zoo!r}: "
                           "pick another name or use --force")
        print(f"[space] reusing the finished space {storage.uri_of(run_dir)}")
        differs = _architecture_changes(info.get("architecture", {}), cfg)
        if differs:
            print(f"[space] note: it was trained with {', '.join(differs)}, not as this config says; "
                  "--force retrains it", flush=True)
        metrics_rel = f"{files_dir(cfg.name, info.get('files', ''))}/metrics.json"
        print(format_table(storage.read_json(metrics_rel)["val"]))
        return storage.uri_of(run_dir)

    from tans.lease import Lease

    with Lease(storage, run_dir, what="tans train-space") as lease:
        now_finished = storage.is_file(f"{run_dir}/space.json")
        if now_finished and not cfg.force:  # another writer finished it just before us: reuse it
            return train_space(cfg, storage)
        return _train_new(cfg, storage, now_finished, lease)


def _architecture(cfg: SpaceConfig) -> dict:
    """The network sizes and options space.json records (and build_space_model reads back)."""
    return {"embed_dim": cfg.embed_dim, "hidden": cfg.hidden, "attention": cfg.attention,
            "predictor_hidden": cfg.predictor_hidden, "task_features": cfg.task_features}


def _architecture_changes(stored: dict, cfg: SpaceConfig) -> list[str]:
    """``key=stored value`` for every architecture setting a finished space differs in from ``cfg``
    (a space from before an option existed was trained without it)."""
    wanted = _architecture(cfg)
    return [f"{k}={stored.get(k, False if k == 'task_features' else None)}" for k, v in wanted.items()
            if stored.get(k, False if k == "task_features" else None) != v]


def _train_new(cfg: SpaceConfig, storage: Storage, finished: bool, lease) -> str:
    """Train the space ``cfg.name`` (holding its lease), swap it in, return its URI."""
    import torch

    from jobs.extract_queries import extract_queries, extractor_spec, space_tasks
    from tans.space.store import finish_space, index_table, save_model_state, space_dir
    from tans.space.training import SpaceModel, ZooArrays, evaluate_space, index_embeddings
    from tans.zoo.store import read_manifest, read_zoo
    from tans.zoo.supernets import get_family

    run_dir = space_dir(cfg.name)
    t_start = time.perf_counter()
    manifest = read_manifest(storage, cfg.zoo)
    family = get_family(manifest.family)
    train, val = space_tasks(cfg, storage)
    spec = extractor_spec(cfg, storage)
    from tans.space.features import checkpoint_sha256

    spec.sha256 = checkpoint_sha256(spec.uri) if spec.uri else ""  # lineage: consumers check it
    splits = load_splits(cfg.splits)
    transfer = _transfer_config(cfg, storage, splits, train)
    extract_queries(storage, spec, train + val + (transfer["tasks"] if transfer else []), cfg.queries)
    from tans.space.features import read_query

    feature_dim = int(read_query(storage, spec.name, train[0])[0].shape[1])
    info = {
        "run": cfg.name, "zoo": cfg.zoo, "family": manifest.family, "image_size": manifest.image_size,
        "extractor": spec.to_dict(), "feature_dim": feature_dim, "splits": cfg.splits,
        "splits_hash": splits.digest(), "zoo_splits_hash": manifest.splits_hash, "train_tasks": train,
        "val_tasks": val, "architecture": _architecture(cfg), "transfer": _transfer_info(cfg, transfer),
    }
    files, out_dir = _files_for_run(cfg, storage, finished)
    info["files"] = files
    print(f"[space] {cfg.name}: zoo {cfg.zoo} ({manifest.rows} models), {len(train)} meta-train / {len(val)} "
          f"meta-val tasks, features {feature_dim}-d from {spec.name}; {cfg.steps} steps on "
          f"{cfg.num_workers} worker(s) -> {storage.uri_of(out_dir)}", flush=True)

    from jobs import runtime

    runtime.init_ray()
    from ray.util.queue import Queue

    progress = Queue(actor_options={"num_cpus": 0})
    config = {
        "root": storage.uri, "zoo": cfg.zoo, "extractor": spec.name, "train_tasks": train, "val_tasks": val,
        "info": info, "seed": cfg.seed, "steps": cfg.steps, "eval_every": cfg.eval_every, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "lam": cfg.lam, "margin": cfg.margin, "per_class": cfg.per_class,
        "tasks_per_step": cfg.tasks_per_step, "threads": cfg.cpus_per_worker, "tb_rel": f"{out_dir}/tb",
        "progress": progress, "transfer": transfer,
    }
    t0 = time.perf_counter()
    printer = threading.Thread(target=drain_progress, args=(progress, _progress_line), daemon=True)
    printer.start()
    try:
        result = _trainer(cfg, storage, config, out_dir).fit()
    finally:
        progress.put(None)
        printer.join(timeout=10)
        progress.shutdown()
    train_s = time.perf_counter() - t0
    ckpt, best = _best_checkpoint(result)
    with ckpt.as_directory() as d:
        state_dict = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]
    if result.checkpoint is not None:  # the full curve lives in the latest checkpoint's state
        with result.checkpoint.as_directory() as d, open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]

    model = SpaceModel(family, feature_dim, cfg.embed_dim, cfg.hidden, cfg.attention, cfg.predictor_hidden,
                       cfg.task_features)
    model.load_state_dict(state_dict)
    model.eval()
    zoo_table = read_zoo(storage, cfg.zoo)
    queries = {t: read_query(storage, spec.name, t) for t in train + val}
    zoo_all = ZooArrays.from_table(zoo_table).with_task_features(queries)
    queries = {t: queries[t] for t in val}
    val_metrics = evaluate_space(model, zoo_all, queries)  # the chosen checkpoint, recomputed here
    embeddings = index_embeddings(model, zoo_all)

    save_model_state(storage, cfg.name, model.state_dict(), files)
    storage.write_parquet(f"{out_dir}/index.parquet", index_table(zoo_table, embeddings))
    metrics = {"val": val_metrics, "val_tasks": val, "train_tasks": train, "best_step": best["step"],
               "selection": "lowest meta-val mean rank of the best model, ties by Kendall tau",
               "train_seconds": round(train_s, 1), "history": history}
    storage.write_json(f"{out_dir}/metrics.json", metrics)
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "curves.png")
        plot_curves(history, val_metrics["baselines"], png)
        with open(png, "rb") as f:
            storage.write_bytes(f"{out_dir}/curves.png", f.read())
    info.update({"index_rows": int(zoo_table.num_rows), "best_step": best["step"], "config": to_dict(cfg),
                 "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    lease.check()  # another writer took the run over: leave the swap to it
    finish_space(storage, cfg.name, info)  # the swap: space.json names `files`; stale files go after
    print(format_table(val_metrics))
    print(f"[space] done in {time.perf_counter() - t_start:.0f}s (best step {best['step']}) -> "
          f"{storage.uri_of(run_dir)} (spaces/LATEST = {cfg.name})")
    return storage.uri_of(run_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tans train-space", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="space config YAML (default: configs/space/local.yaml)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--force", action="store_true", help="retrain even if the run is finished")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    overrides += ([as_override("root", args.root)] if args.root else []) + (["force=true"] if args.force else [])
    cfg: SpaceConfig = load_job_config("space", args.config, overrides)
    train_space(cfg, Storage(cfg.root or None))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
