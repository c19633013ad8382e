"""Ray work items of the zoo build: per-task fine-tunes and per-(task, subnets) measurements.

The driver submits every fine-tune and every measurement item at once; a measurement item takes
its task's fine-tune result as an argument, so Ray starts it as soon as that supernet exists and
measuring overlaps fine-tuning. When all items of a task are back, the driver writes the task's
zoo part in one atomic write - a killed build loses at most unfinished tasks, never half a part.
"""

from __future__ import annotations

import io
import os
import sys
import time
from datetime import UTC, datetime

import ray
import torch

from tans import paths
from tans.job_configs import ZooConfig
from tans.storage import Storage
from tans.zoo.store import ZooRow, write_part


def task_supernet_rel(zoo: str, task: str, generation: str = "") -> str:
    return paths.task_supernet_file(zoo, task, generation)


def _readable_state(storage: Storage, rel: str) -> bool:
    from tans.storage import CorruptArtifact

    try:
        storage.read_torch(rel)
        return True
    except CorruptArtifact:
        return False


def _load_state(storage: Storage, rel: str) -> dict:
    return storage.read_torch(rel)


def _save_state(storage: Storage, rel: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(rel, buf.getvalue())


def subset_rows(n_rows: int, n: int, seed: int) -> torch.Tensor:
    """A seeded choice of at most ``n`` of ``n_rows`` rows (all of them, in order, if fewer)."""
    if n_rows <= n:
        return torch.arange(n_rows)
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:n]


def bn_rows(n_rows: int, batches: int, batch_size: int, seed: int) -> torch.Tensor:
    """The rows of the first ``batches`` full batches of ``iter_batches(shuffle=True, seed)``."""
    from tans.data.reader import shuffled_order

    full = (n_rows // batch_size) * batch_size  # drop_last: a partial batch is never used
    return shuffled_order(n_rows, seed)[: min(full, batches * batch_size)]


def _device(gpus: float) -> torch.device:
    """The GPU when this work item was given a share of one, else the CPU."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def finetune_task(storage_uri: str, cfg: ZooConfig, base_rel: str, task: str, generation: str = "") -> str:
    """Fine-tune the base supernet on ``task`` (new head); save it; return its relative path."""
    from tans.data.reader import load_task_rows
    from tans.zoo.elastic import finetune_for_task
    from tans.zoo.supernets import get_family

    storage = Storage(storage_uri)
    rel = task_supernet_rel(cfg.name, task, generation)
    if storage.is_file(rel) and not cfg.force and _readable_state(storage, rel):
        return rel  # a resumed build reuses finished fine-tunes (a damaged one is redone)
    torch.set_num_threads(max(1, int(cfg.finetune.cpus_per_task)))
    family = get_family(cfg.family)
    # Only the rows the fine-tune uses are decoded.
    data = load_task_rows(storage, task, "train", cfg.image_size,
                          lambda n: subset_rows(n, cfg.finetune.images_per_task, cfg.seed))
    model, metrics = finetune_for_task(
        _load_state(storage, base_rel),
        family,
        data.num_classes,
        data,
        steps=cfg.finetune.steps,
        batch_size=cfg.finetune.batch_size,
        lr=cfg.finetune.lr,
        seed=cfg.seed,
        random_subnets=cfg.finetune.random_subnets,
        device=_device(cfg.finetune.gpus_per_task),
        precision=cfg.finetune.precision,
    )
    _write_curve(storage, f"{rel.rsplit('/', 1)[0]}/tb", "finetune/loss", metrics["losses"])
    _save_state(storage, rel, {k: v.cpu() for k, v in model.state_dict().items()})
    return rel


def _write_curve(storage: Storage, rel_dir: str, tag: str, values: list[float]) -> None:
    """A TensorBoard event file of one curve, written locally then copied into the root."""
    import tempfile

    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="tans-tb-") as tmp:
        writer = SummaryWriter(logdir=tmp)
        for step, value in enumerate(values, start=1):
            writer.add_scalar(tag, value, step)
        writer.close()
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(f"{rel_dir}/{name}", f.read())


def measure_items(storage_uri: str, cfg: ZooConfig, task: str, supernet_rel: str, archs: list) -> dict:
    """Measure ``archs`` on ``task``'s supernet; returns rows (as dicts), node id and timing."""
    from tans.data.reader import iter_batches, load_task_rows
    from tans.zoo.measure import measure_subnet, probe_batch
    from tans.zoo.subnets import model_id
    from tans.zoo.supernets import get_family

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.measure.cpus_per_item)))
    storage = Storage(storage_uri)
    family = get_family(cfg.family)
    m = cfg.measure
    # Decode only what is measured on: the BatchNorm batches (the first batches of the seeded
    # shuffle, in its order) and the seeded test subset.
    bn_data = load_task_rows(storage, task, "train", cfg.image_size,
                             lambda n: bn_rows(n, m.bn_batches, m.bn_batch_size, cfg.seed))
    test = load_task_rows(storage, task, "test", cfg.image_size, lambda n: subset_rows(n, m.test_images, cfg.seed + 1))
    device = _device(m.gpus_per_item)
    model = family.build(bn_data.num_classes)
    model.load_state_dict(_load_state(storage, supernet_rel))
    model.to(device)
    bn = [x.to(device) for x, _ in iter_batches(bn_data, m.bn_batch_size)]
    test_batches = [(x.to(device), y.to(device)) for x, y in iter_batches(test, 256)]
    probe = probe_batch(m.probe_size, cfg.image_size, m.probe_seed).to(device)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for arch in archs:
        meas = measure_subnet(model, arch, bn, test_batches, cfg.image_size, probe, precision=m.precision)
        rows.append(
            ZooRow(
                model_id=model_id(family.name, task, arch),
                task=task,
                family=family.name,
                ks=list(arch.ks),
                e=list(arch.e),
                d=list(arch.d),
                accuracy=float(meas.accuracy),
                n_params=int(meas.n_params),
                flops=int(meas.flops),
                f_emb=[float(x) for x in meas.f_emb],
                supernet_uri=storage.uri_of(supernet_rel),
                image_size=cfg.image_size,
                created_at=created,
            ).__dict__
        )
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return {"task": task, "rows": rows, "node_id": node, "pid": os.getpid(), "seconds": time.perf_counter() - t0}


def build_tasks(cfg: ZooConfig, storage: Storage, base_rel: str, tasks: list[str], generation: str = "") -> list[dict]:
    """Fine-tune and measure ``tasks`` on Ray; write each task's part when it completes.

    Returns one record per work item (task, node id, pid, seconds) for the job's results.
    """
    from tqdm import tqdm

    from tans.zoo.subnets import task_archs
    from tans.zoo.supernets import get_family

    family = get_family(cfg.family)
    ft = ray.remote(num_cpus=cfg.finetune.cpus_per_task, num_gpus=cfg.finetune.gpus_per_task, max_retries=2)(
        finetune_task
    )
    ms = ray.remote(num_cpus=cfg.measure.cpus_per_item, num_gpus=cfg.measure.gpus_per_item, max_retries=2)(
        measure_items
    )
    pending: dict = {}
    left: dict[str, int] = {}
    for task in tasks:
        supernet = ft.remote(storage.uri, cfg, base_rel, task, generation)
        archs = task_archs(family, cfg.measure.subnets_per_task, cfg.measure.seed, task, cfg.measure.per_task_archs)
        items = measure_chunks(cfg, archs, _items_per_task(cfg))
        left[task] = len(items)
        for part in items:
            pending[ms.remote(storage.uri, cfg, task, supernet, part)] = task
    results: dict[str, list[dict]] = {t: [] for t in tasks}
    records = []
    bar = tqdm(total=len(tasks), desc="zoo tasks", unit="task", file=sys.stderr, disable=None)
    t0 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        out = ray.get(done[0])
        results[task].extend(out["rows"])
        records.append({k: out[k] for k in ("task", "node_id", "pid", "seconds")})
        left[task] -= 1
        if left[task] == 0:
            rows = sorted((ZooRow(**r) for r in results.pop(task)), key=lambda r: r.model_id)
            write_part(storage, cfg.name, task, rows, generation)
            bar.update(1)
            finished = len(tasks) - len(left_tasks(left))
            eta = (time.perf_counter() - t0) / finished * (len(tasks) - finished)
            print(f"[zoo] {task}: {len(rows)} subnets, accuracy {min(r.accuracy for r in rows):.3f}-"
                  f"{max(r.accuracy for r in rows):.3f} ({finished}/{len(tasks)} tasks, ETA {eta / 60:.1f} min)",
                  flush=True)
    bar.close()
    return records


def measure_chunks(cfg: ZooConfig, archs: list, items_per_task: int) -> list[list]:
    """``archs`` cut into the measurement work items of a task (``items_per_task`` for a whole task)."""
    chunk = max(1, -(-cfg.measure.subnets_per_task // max(1, items_per_task)))
    return [archs[i : i + chunk] for i in range(0, len(archs), chunk)]


def left_tasks(left: dict[str, int]) -> list[str]:
    return [t for t, n in left.items() if n > 0]


def _items_per_task(cfg: ZooConfig) -> int:
    # Enough items per task to spread a task over the cluster, few enough that each item's
    # fixed cost (building the supernet, loading its weights and the task's rows: ~0.6 s on one
    # core) stays small next to measuring (~1 s per subnet at 48 px): 8 subnets per item.
    return max(1, min(4, cfg.measure.subnets_per_task // 8))

