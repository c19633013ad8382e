"""A tiny random space and a tiny task in a storage root, made in a second (tests, load benchmark).

Not for production: the space's networks are random (seeded), so its answers mean nothing, but
it has every file a trained space has (``model.pt``, ``index.parquet``, ``space.json``,
``spaces/LATEST``) and a real supernet extractor checkpoint, so the service runs exactly the code
it runs on a trained space. No ``import ray``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

FAMILY = "ofa_mbv3_tiny"
IMAGE_SIZE = 32


def toy_zoo_table(prefix: str, n_tasks: int, per_task: int, seed: int) -> pa.Table:
    """``n_tasks * per_task`` zoo rows with random architectures, sizes and functional embeddings."""
    from tans.zoo.store import ZOO_SCHEMA
    from tans.zoo.supernets import get_family

    f_dim = get_family(FAMILY).penultimate_dim
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        for m in range(per_task):
            rows.append({
                "model_id": f"{prefix}-t{t}-m{m}", "task": f"{prefix}_task{t}", "family": FAMILY,
                "ks": [int(v) for v in rng.choice([3, 5], 20)], "e": [int(v) for v in rng.choice([3, 4], 20)],
                "d": [int(v) for v in rng.choice([2, 3], 5)], "accuracy": float(rng.uniform(0.3, 0.9)),
                "n_params": int(rng.integers(100_000, 1_000_000)), "flops": int(rng.integers(1_000_000, 10_000_000)),
                "f_emb": rng.normal(size=f_dim).astype(np.float32).tolist(), "supernet_uri": "toy",
                "image_size": IMAGE_SIZE, "created_at": "",
            })
    return pa.Table.from_pylist(rows, schema=ZOO_SCHEMA)


def make_toy_space(root: str, run: str, seed: int = 0, n_tasks: int = 3, per_task: int = 4, embed_dim: int = 8,
                   set_latest: bool = True, queries: bool = True) -> str:
    """Write a finished random space ``<root>/spaces/<run>``; returns its URI.

    Its extractor is a seeded ``ofa_mbv3_tiny`` supernet saved in the space's folder (``toy-extractor.pt``).
    Model ids are ``<run>-t<task>-m<model>``, so answers from different spaces never collide. With
    ``queries``, each zoo task gets a stored query: the extractor's features of toy images of its
    own colours, so the nearest-dataset prior has task means to compare a request with.
    """
    from tans.space.features import ExtractorSpec, build_extractor, write_query
    from tans.space.store import finish_space, index_table, save_model_state, space_dir
    from tans.space.training import SpaceModel, ZooArrays, index_embeddings
    from tans.storage import Storage
    from tans.zoo.supernets import get_family

    storage = Storage(root)
    family = get_family(FAMILY)
    torch.manual_seed(seed)
    extractor_rel = f"{space_dir(run)}/toy-extractor.pt"
    extractor_path = storage.path(extractor_rel)
    net = family.build(num_classes=2)
    with storage.atomic_writer(extractor_rel) as buf:
        torch.save(net.state_dict(), buf)
    model = SpaceModel(family, feature_dim=family.penultimate_dim, embed_dim=embed_dim, hidden=16,
                       predictor_hidden=8).eval()
    table = toy_zoo_table(run, n_tasks, per_task, seed)
    emb = index_embeddings(model, ZooArrays.from_table(table))
    save_model_state(storage, run, model.state_dict())
    storage.write_parquet(f"{space_dir(run)}/index.parquet", index_table(table, emb))
    spec = ExtractorSpec(kind="supernet", uri=extractor_path, family=FAMILY, image_size=IMAGE_SIZE)
    tasks = sorted(set(table.column("task").to_pylist()))
    if queries:
        extractor = build_extractor(spec)
        for i, task in enumerate(tasks):
            images, labels = toy_images(3, 4, seed=1000 * seed + i)
            features = extractor(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
            write_query(storage, spec.name, task, features.numpy(), labels)
    info = {"run": run, "zoo": f"toy-{FAMILY}-{IMAGE_SIZE}px", "family": FAMILY, "image_size": IMAGE_SIZE,
            "feature_dim": family.penultimate_dim, "extractor": spec.to_dict(), "train_tasks": tasks if queries else [],
            "architecture": {"embed_dim": embed_dim, "hidden": 16, "attention": False, "predictor_hidden": 8}}
    finish_space(storage, run, info, set_latest=set_latest)
    return storage.uri_of(space_dir(run))


def toy_images(n_classes: int, per_class: int, size: int = IMAGE_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images ``N x size x size x 3``, int labels ``N``): one mean colour per class plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        colour = rng.integers(30, 226, size=3)
        for _ in range(per_class):
            images.append(np.clip(rng.normal(colour, 25, size=(size, size, 3)), 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def make_toy_task(root: str, name: str, n_classes: int = 3, per_class: int = 6, size: int = 24, seed: int = 0) -> str:
    """Write a small task (PNG parts + ``task.json``) into the storage root; returns its name."""
    from tans.data.tasks import TaskInfo, encode_png, write_task
    from tans.storage import Storage

    images, labels = toy_images(n_classes, per_class, size=size, seed=seed)
    pngs = [encode_png(img) for img in images]
    info = TaskInfo(name=name, classes=[f"c{i}" for i in range(n_classes)], source="toy", licence="CC0",
                    image_size=size, channels=3, counts={})
    # per class: the first two thirds go to train, the rest to test
    in_train = np.concatenate([np.arange(per_class) < max(1, (2 * per_class) // 3)] * n_classes)
    train, test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    write_task(Storage(root), info, {"train": [pngs[i] for i in train], "test": [pngs[i] for i in test]},
               {"train": labels[train].tolist(), "test": labels[test].tolist()}, force=True)
    return name
