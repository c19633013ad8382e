"""A trained space on storage: ``<root>/spaces/<run>/`` and ``<root>/spaces/LATEST``.

Layout of a finished run (``space.json`` is written after everything it names, and
``spaces/LATEST`` after that, so a reader never sees half a space)::

    spaces/<run>/model.pt        state dict of tans.space.training.SpaceModel (weights_only)
    spaces/<run>/index.parquet   every zoo column except f_emb, plus `embedding` (unit vectors)
    spaces/<run>/metrics.json    val metrics of the chosen checkpoint, baselines, curves
    spaces/<run>/curves.png      loss and R@k over training
    spaces/<run>/tb/             TensorBoard logs
    spaces/<run>/space.json      lineage: zoo, family, extractor, image size, feature size, splits

``--force`` on a finished run builds beside it, then swaps: the new files go to a generation folder
``spaces/<run>/g-<id>/`` (same names as above), and the new ``space.json``, whose ``files`` key
names that folder, replaces the old one in one atomic write (a rename locally, one PUT on S3, which
has no atomic directory rename). Until then the old ``space.json`` and the files it names stay
complete and ``spaces/LATEST`` keeps pointing at a finished run; a crash at any moment leaves the
old space or the new one, never neither. Files no ``space.json`` names are deleted after the swap.

:func:`load_space` reads it back into a :class:`tans.space.retrieval.Retriever` (what search and
serving use). No ``import ray``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from tans import paths
from tans.names import NAME_RULE, is_bare_name, is_valid_name
from tans.space.encoders import SpaceError
from tans.space.features import ExtractorSpec
from tans.storage import CorruptArtifact, Storage, StorageError, new_generation  # noqa: F401 (re-export)

LATEST = paths.LATEST_SPACE
INDEX_DROP = ("f_emb",)
GENERATION_PREFIX = "g-"
# What a run's files folder holds (the run folder itself, or a g-<id>/ generation inside it).
RUN_FILES = ("model.pt", "index.parquet", "metrics.json", "curves.png", "tb", "ray_train")


class SpaceNotFound(SpaceError):
    """A space URI that does not point at a finished space."""


def space_dir(run: str) -> str:
    return paths.space_dir(run)


def index_table(zoo_table: pa.Table, embeddings: torch.Tensor) -> pa.Table:
    """The zoo table without ``f_emb``, plus each row's model embedding."""
    keep = [c for c in zoo_table.column_names if c not in INDEX_DROP]
    emb = np.asarray(embeddings, dtype=np.float32)
    return zoo_table.select(keep).append_column("embedding", pa.array(list(emb), type=pa.list_(pa.float32())))


def files_dir(run: str, files: str = "") -> str:
    """Where a run's files live: ``spaces/<run>`` or its generation ``spaces/<run>/<files>``."""
    return f"{space_dir(run)}/{files}" if files else space_dir(run)


def save_model_state(storage: Storage, run: str, state_dict: dict, files: str = "") -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    storage.write_bytes(f"{files_dir(run, files)}/model.pt", buf.getvalue())


def finish_space(storage: Storage, run: str, info: dict, set_latest: bool = True) -> None:
    """Write ``space.json`` (after the files it names) and then ``spaces/LATEST``; drop stale files.

    ``info["files"]`` (default "") names the generation folder the files were written to.
    """
    files = info.setdefault("files", "")
    storage.write_json(f"{space_dir(run)}/space.json", info)
    if set_latest:
        storage.write_text(LATEST, run + "\n")
    drop_stale_files(storage, run, files)


def drop_stale_files(storage: Storage, run: str, files: str) -> None:
    """Delete what the finished ``space.json`` no longer names (old generations, old top-level files)."""
    for entry in storage.list(space_dir(run)):
        name = entry.rsplit("/", 1)[-1]
        other_generation = name.startswith(GENERATION_PREFIX) and name != files
        if other_generation or (files and name in RUN_FILES):
            storage.delete(entry)


def resolve_space(uri: str | None) -> tuple[Storage, str]:
    """(storage root, run) for a space URI.

    Accepted: ``<root>/spaces/<run>`` (local path or s3://), ``<root>`` (its ``spaces/LATEST``),
    a bare run name (in the default storage root), or None (the default root's LATEST).
    """
    if not uri:
        storage = Storage()
        return storage, _latest(storage)
    text = uri.rstrip("/")
    if is_bare_name(text):
        _check_run(text, uri)
        return Storage(), text
    parent, _, run = text.rpartition("/")
    if parent.endswith(f"/{paths.SPACES}") or parent == paths.SPACES:
        _check_run(run, uri)
        return Storage(parent[: -len(f"/{paths.SPACES}")] if parent != paths.SPACES else "."), run
    storage = Storage(text)
    return storage, _latest(storage)


def space_root_uri(space_uri: str) -> str | None:
    """The URI of the storage root a loaded space lives in, from its ``<root>/spaces/<run>`` URI
    (as ``space.json``'s ``uri`` records it); None for a URI of no root (a space built in memory)."""
    head, sep, _ = str(space_uri).rpartition(f"/{paths.SPACES}/")
    return head if sep and head else None


def space_location(space: str, storage: Storage) -> str:
    """What to load for a job's ``space`` setting in the root ``storage``: a bare run name is a run
    of that root (not of the default root), "" is the root's LATEST, anything else a URI as given."""
    if not space:
        return storage.uri
    if is_bare_name(space.rstrip("/")):
        return storage.uri_of(space_dir(space.rstrip("/")))
    return space


def _check_run(run: str, uri: str) -> None:
    if not is_valid_name(run):
        raise SpaceNotFound(f"{uri!r}: {run!r} is not a valid space run name ({NAME_RULE})")


def _latest(storage: Storage) -> str:
    try:
        run = storage.read_bytes(LATEST).decode().strip()
    except (StorageError, FileNotFoundError):
        raise SpaceNotFound(f"no trained space in {storage.uri} (no {LATEST}); run `tans train-space` first") from None
    if not run:
        raise SpaceNotFound(f"{storage.uri_of(LATEST)} is empty")
    _check_run(run, storage.uri_of(LATEST))
    return run


def read_space_info(storage: Storage, run: str) -> dict:
    rel = f"{space_dir(run)}/space.json"
    try:
        return storage.read_json(rel)
    except CorruptArtifact:
        raise
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


def read_index(storage: Storage, run: str, info: dict | None = None) -> IndexColumns:
    info = read_space_info(storage, run) if info is None else info
    rel = f"{files_dir(run, info.get('files', ''))}/index.parquet"
    if not storage.is_file(rel):
        raise SpaceNotFound(f"the space {storage.uri_of(space_dir(run))} has no index.parquet")
    table = storage.read_parquet(rel)  # a damaged file: CorruptArtifact, naming it and the rebuild
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
    from tans.space.training import SpaceModel
    from tans.zoo.supernets import get_family

    arch = info["architecture"]
    return SpaceModel(get_family(info["family"]), info["feature_dim"], arch["embed_dim"], arch["hidden"],
                      arch["attention"], arch["predictor_hidden"], arch.get("task_features", False))


def load_space_model(storage: Storage, run: str, info: dict):
    model = build_space_model(info)
    rel = f"{files_dir(run, info.get('files', ''))}/model.pt"
    if not storage.is_file(rel):
        raise SpaceNotFound(f"the space {storage.uri_of(space_dir(run))} has no model.pt")
    state = storage.read_torch(rel)  # a damaged file: CorruptArtifact, naming it and the rebuild
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise storage.corrupt(rel, f"does not fit the network space.json describes ({first})") from None
    return model.eval()


def load_space(uri: str | None = None):
    """A ready :class:`tans.space.retrieval.Retriever` for the space at ``uri`` (see :func:`resolve_space`)."""
    from tans.space.retrieval import Retriever

    storage, run = resolve_space(uri)
    info = read_space_info(storage, run)
    model = load_space_model(storage, run, info)
    idx = read_index(storage, run, info)
    return Retriever(idx.model_ids, idx.tasks, idx.n_params, idx.flops, idx.families, idx.embeddings,
                     model.query_encoder, model.predictor,
                     info={**info, "run": run, "uri": storage.uri_of(space_dir(run))},
                     extractor_spec=ExtractorSpec.from_dict(info["extractor"]), index_table=idx.table)
