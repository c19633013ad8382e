"""A trained space on storage: ``<root>/spaces/<run>/`` and ``<root>/spaces/LATEST``.

Layout of a finished run (``space.json`` is written after everything it names, and
``spaces/LATEST`` after that, so a reader never sees half a space)::

    spaces/<run>/model.pt        state dict of tans.space_training.SpaceModel (weights_only)
    spaces/<run>/index.parquet   every zoo column except f_emb, plus `embedding` (unit vectors)
    spaces/<run>/metrics.json    val metrics of the chosen checkpoint, baselines, curves
    spaces/<run>/curves.png      loss and R@k over training
    spaces/<run>/tb/             TensorBoard logs
    spaces/<run>/space.json      lineage: zoo, family, extractor, image size, feature size, splits

:func:`load_space` reads it back into a :class:`tans.retrieval.Retriever` (what search and
serving use). No ``import ray``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from tans.encoders import SpaceError
from tans.features import ExtractorSpec
from tans.storage import Storage, StorageError

LATEST = "spaces/LATEST"
INDEX_DROP = ("f_emb",)


class SpaceNotFound(SpaceError):
    """A space URI that does not point at a finished space."""


def space_dir(run: str) -> str:
    return f"spaces/{run}"


def index_table(zoo_table: pa.Table, embeddings: torch.Tensor) -> pa.Table:
    """The zoo table without ``f_emb``, plus each row's model embedding."""
    keep = [c for c in zoo_table.column_names if c not in INDEX_DROP]
    emb = np.asarray(embeddings, dtype=np.float32)
    return zoo_table.select(keep).append_column("embedding", pa.array(list(emb), type=pa.list_(pa.float32())))


def save_model_state(storage: Storage, run: str, state_dict: dict) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    storage.write_bytes(f"{space_dir(run)}/model.pt", buf.getvalue())


def finish_space(storage: Storage, run: str, info: dict, set_latest: bool = True) -> None:
    """Write ``space.json`` (after the files it names) and then ``spaces/LATEST``."""
    storage.write_json(f"{space_dir(run)}/space.json", info)
    if set_latest:
        storage.write_text(LATEST, run + "\n")


def resolve_space(uri: str | None) -> tuple[Storage, str]:
    """(storage root, run) for a space URI.

    Accepted: ``<root>/spaces/<run>`` (local path or s3://), ``<root>`` (its ``spaces/LATEST``),
    a bare run name (in the default storage root), or None (the default root's LATEST).
    """
    if not uri:
        storage = Storage()
        return storage, _latest(storage)
    text = uri.rstrip("/")
    if "/" not in text and "\\" not in text and ":" not in text:
        storage = Storage()
        return storage, text
    parent, _, run = text.rpartition("/")
    if parent.endswith("/spaces") or parent == "spaces":
        return Storage(parent[: -len("/spaces")] if parent != "spaces" else "."), run
    storage = Storage(text)
    return storage, _latest(storage)


def _latest(storage: Storage) -> str:
    try:
        run = storage.read_bytes(LATEST).decode().strip()
    except (StorageError, FileNotFoundError):
        raise SpaceNotFound(f"no trained space in {storage.uri} (no {LATEST}); run `tans train-space` first") from None
    if not run:
        raise SpaceNotFound(f"{storage.uri_of(LATEST)} is empty")
    return run


def read_space_info(storage: Storage, run: str) -> dict:
    rel = f"{space_dir(run)}/space.json"
    try:
        return storage.read_json(rel)
    except (StorageError, FileNotFoundError):
        raise SpaceNotFound(f"no finished space at {storage.uri_of(space_dir(run))} (no space.json)") from None


@dataclass
class IndexColumns:
    model_ids: np.ndarray
    tasks: np.ndarray
    families: np.ndarray
    n_params: np.ndarray
    flops: np.ndarray
    embeddings: np.ndarray
    table: pa.Table


def read_index(storage: Storage, run: str) -> IndexColumns:
    try:
        table = storage.read_parquet(f"{space_dir(run)}/index.parquet")
    except (StorageError, FileNotFoundError):
        raise SpaceNotFound(f"the space {storage.uri_of(space_dir(run))} has no index.parquet") from None
    emb = table.column("embedding").combine_chunks()
    dim = len(emb[0]) if len(emb) else 0
    return IndexColumns(
        model_ids=np.asarray(table.column("model_id").to_pylist(), dtype=object),
        tasks=np.asarray(table.column("task").to_pylist(), dtype=object),
        families=np.asarray(table.column("family").to_pylist(), dtype=object),
        n_params=np.asarray(table.column("n_params").to_pylist(), dtype=np.int64),
        flops=np.asarray(table.column("flops").to_pylist(), dtype=np.int64),
        embeddings=np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim),
        table=table,
    )


def build_space_model(info: dict):
    """An untrained SpaceModel with the sizes recorded in ``space.json``."""
    from tans.space_training import SpaceModel
    from tans.supernets import get_family

    arch = info["architecture"]
    return SpaceModel(get_family(info["family"]), info["feature_dim"], arch["embed_dim"], arch["hidden"],
                      arch["attention"], arch["predictor_hidden"])


def load_space_model(storage: Storage, run: str, info: dict):
    model = build_space_model(info)
    try:
        raw = storage.read_bytes(f"{space_dir(run)}/model.pt")
    except (StorageError, FileNotFoundError):
        raise SpaceNotFound(f"the space {storage.uri_of(space_dir(run))} has no model.pt") from None
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_space(uri: str | None = None):
    """A ready :class:`tans.retrieval.Retriever` for the space at ``uri`` (see :func:`resolve_space`)."""
    from tans.retrieval import Retriever

    storage, run = resolve_space(uri)
    info = read_space_info(storage, run)
    model = load_space_model(storage, run, info)
    idx = read_index(storage, run)
    return Retriever(idx.model_ids, idx.tasks, idx.n_params, idx.flops, idx.families, idx.embeddings,
                     model.query_encoder, model.predictor,
                     info={**info, "run": run, "uri": storage.uri_of(space_dir(run))},
                     extractor_spec=ExtractorSpec.from_dict(info["extractor"]), index_table=idx.table)
