"""Label a dataset with an exported model: batch inference on Ray Data.

    python -m jobs.predict --model URI --dataset SRC [--split test|train] [--out URI] [--root ROOT]
                           [--batch-size N] [--concurrency N] [--cpus-per-actor N]

``--model`` is a directory written by :func:`tans.selection.export.export_model` (local, ``s3://``, or a
path under the storage root such as ``searches/<run>/model``). ``--dataset`` is a directory of
image files (local or ``s3://``, read recursively; an ImageFolder works as is, a single image
file too), or a task of the storage root: ``task:<name>`` or a bare task name, ``--split``
(default ``test``) picking the split.

Output: one Parquet file, default ``<root>/predictions/<model>-<dataset>.parquet``, with one row
per readable image: ``path`` (the file's path or URI, or ``<task>/<split>/<row>`` with ``row``
the row's index in the split as :func:`tans.data.tasks.read_split` orders it), ``label`` (int),
``class`` (its name), ``confidence`` (the softmax maximum) and, for a task, ``true_label``.
Files that do not decode as images, or whose header declares more pixels than the bound
(50 M, ``$TANS_MAX_IMAGE_PIXELS``; tans.data.image_limits), are skipped, counted and named on stdout,
never fatal. For a task the accuracy is printed and stored, with the counts, in the file's metadata (key
``tans.predict``).

Ray Data runs it: the image bytes are read by I/O tasks (``read_binary_files``, or per-chunk
reads of the task's Parquet parts) and go through ``map_batches`` on an actor pool of
``--concurrency`` actors, each of which loads the model once, with ``torch.set_num_threads``
equal to its CPUs; images never pass through the driver. Only the predictions (~100 bytes per
image: 1M images are ~100 MB) are collected on the driver, sorted, and written as one file with
:meth:`tans.storage.Storage.write_parquet` - atomic locally (temp file + rename) and on S3 (one
upload made visible when complete). ``Dataset.write_parquet`` would write a directory of parts
that a crash leaves half-written, and S3 has no directory rename to hide it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import posixpath
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from jobs._common import run_main
from tans.data.ingest import IngestError, open_source
from tans.data.tasks import SPLITS, TASK_NAME_RE, TaskError, read_task_info, task_dir, task_exists
from tans.storage import Storage, StorageError

TASK_PREFIX = "task:"
METADATA_KEY = b"tans.predict"
SKIPPED_SHOWN = 5  # unreadable files named on stdout (all are counted)
SKIPPED_KEPT = 100  # ... and in the output's metadata


@dataclass
class Source:
    """What ``--dataset`` names: a directory of image files or a task split of the storage root."""

    kind: str  # "files" or "task"
    name: str  # used in the default output name
    uri: str
    fs: pafs.FileSystem | None = None
    paths: list[str] = field(default_factory=list)  # files: paths in ``fs``
    storage: Storage | None = None  # task: its storage root
    task: str = ""
    split: str = ""
    rows: int = 0  # task: rows in the split

    @property
    def size(self) -> int:
        return len(self.paths) if self.kind == "files" else self.rows

    def describe(self) -> str:
        if self.kind == "task":
            return f"task {self.task} ({self.split}, {self.rows} images)"
        return f"{self.uri} ({len(self.paths)} files)"


@dataclass
class PredictReport:
    """What a run did: the predictions written, the files skipped, the accuracy (tasks only)."""

    table: pa.Table
    out: str
    skipped: list[str]
    seconds: float
    accuracy: float | None = None


# -- inputs ------------------------------------------------------------------------------------


def model_location(uri: str, root: str | None) -> str:
    """``uri`` as :func:`tans.selection.export.load_model` should read it, absolute so actors find it too.

    A URI, an absolute path, ``~``/``.``-prefixed paths and existing local directories are
    taken as they are; anything else is relative to the storage root (``--root``, else the default).
    """
    uri = str(uri)
    if "://" in uri:
        return uri
    local = os.path.expanduser(uri)
    if uri.startswith(("/", "~", ".")) or os.path.exists(local):
        return os.path.abspath(local)
    base = root or Storage().uri
    return f"{base.rstrip('/')}/{uri.strip('/')}" if "://" in base else os.path.abspath(os.path.join(base, uri))


def list_image_files(src: str) -> tuple[pafs.FileSystem, list[str]]:
    """Every non-hidden file under ``src`` (recursively; ``src`` itself if it is a file), sorted."""
    fs, base, info = open_source(src, missing="no such directory or file")
    if info.type == pafs.FileType.File:
        return fs, [base]
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise IngestError(f"{src}: cannot list ({' '.join(str(exc).split())[:160]})") from None
    paths = sorted(
        e.path for e in entries
        if e.type == pafs.FileType.File
        and not any(p.startswith(".") for p in posixpath.relpath(e.path, base).split("/"))  # .DS_Store, .git
    )
    if not paths:
        raise IngestError(f"{src}: no files (expected image files, in any sub-directories)")
    return fs, paths


def resolve_dataset(src: str, storage: Storage, split: str | None) -> Source:
    """Turn ``--dataset`` into a :class:`Source`; IngestError / TaskError (one line) if it is not there."""
    if src.startswith(TASK_PREFIX):
        return _task_source(src[len(TASK_PREFIX):], storage, split or "test")
    is_path = "://" in src or os.path.exists(os.path.expanduser(src))
    if not is_path and TASK_NAME_RE.match(src) and task_exists(storage, src):
        return _task_source(src, storage, split or "test")
    if not is_path and TASK_NAME_RE.match(src):
        raise IngestError(f"{src}: no such directory, and no task {src!r} in {storage.uri} "
                          "(give an image directory, or ingest the task with `tans data ingest`)")
    if split:
        raise IngestError(f"--split applies to a task (task:<name>), not to the directory {src}")
    uri = src if "://" in src else os.path.abspath(os.path.expanduser(src))
    fs, paths = list_image_files(uri)
    name = posixpath.basename(uri.rstrip("/")) or "dataset"
    return Source(kind="files", name=name, uri=uri, fs=fs, paths=paths)


def _task_source(name: str, storage: Storage, split: str) -> Source:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    info = read_task_info(storage, name)  # TaskError if it is not there
    rows = int(info.counts.get(split, 0))
    if rows == 0:
        raise TaskError(f"task {name!r} has no {split} images")
    return Source(kind="task", name=f"{name}-{split}", uri=storage.uri_of(task_dir(name)), storage=storage,
                  task=name, split=split, rows=rows)


def task_chunks(source: Source, chunk_rows: int) -> list[dict]:
    """Work items ``{rel, start, stop, first_row}`` covering the split's parts in order.

    A part is read whole for each of its chunks (the parts are single row groups), so chunks are
    kept large: they only need to be numerous enough to keep every actor busy.
    """
    import pyarrow.parquet as pq

    storage, task = source.storage, source.task
    info = read_task_info(storage, task)
    items, first = [], 0
    for part in info.parts.get(source.split, []):
        rel = f"{task_dir(task)}/{source.split}/{part}"
        try:
            with storage.fs.open_input_file(storage.path(rel)) as f:
                n = pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise TaskError(f"task {task!r} is incomplete: {rel}: {' '.join(str(exc).split())[:120]}") from None
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            items.append({"rel": rel, "start": start, "stop": stop, "first_row": first + start})
        first += n
    return items


def read_task_chunk(batch: dict, storage: Storage, prefix: str) -> dict:
    """Ray Data read step for tasks: one chunk item -> its rows (``path``, ``row``, ``bytes``, ``true_label``)."""
    out: dict[str, list] = {"path": [], "row": [], "bytes": [], "true_label": []}
    for rel, start, stop, first in zip(batch["rel"], batch["start"], batch["stop"], batch["first_row"]):
        table = storage.read_parquet(str(rel), columns=["image", "label"]).slice(int(start), int(stop) - int(start))
        rows = range(int(first), int(first) + table.num_rows)
        out["path"] += [f"{prefix}/{r}" for r in rows]
        out["row"] += list(rows)
        out["bytes"] += table.column("image").to_pylist()
        out["true_label"] += table.column("label").to_pylist()
    return {"path": np.asarray(out["path"], dtype=object), "row": np.asarray(out["row"], dtype=np.int64),
            "bytes": np.asarray(out["bytes"], dtype=object),
            "true_label": np.asarray(out["true_label"], dtype=np.int64)}


# -- the actor ---------------------------------------------------------------------------------


def decode(data, loaded):
    """One image's network input (``1 x C x S x S``) as the export's preprocessing makes it, or
    ``None`` if ``data`` is not a readable image or declares more pixels than the bound."""
    from tans.data.image_limits import open_bounded

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd metadata; the pixels are what matter
            img = open_bounded(bytes(data))  # over the pixel bound: skipped before decoding
            img.load()
            return loaded.preprocess(img)
    except Exception:  # PIL raises many types for broken files; all mean "skip"
        return None


class Predictor:
    """One Ray Data actor: loads the exported model once, then labels batches of image bytes."""

    def __init__(self, model_uri: str, threads: int):
        import torch

        from tans.selection.export import load_model

        torch.set_num_threads(max(1, threads))  # one busy thread per granted CPU
        self.loaded = load_model(model_uri)

    def __call__(self, batch: dict) -> dict:
        import torch

        inputs = [decode(data, self.loaded) for data in batch["bytes"]]
        ok = np.array([x is not None for x in inputs], dtype=bool)
        n = len(inputs)
        label = np.full(n, -1, dtype=np.int64)
        confidence = np.full(n, np.nan, dtype=np.float64)
        if ok.any():
            with torch.no_grad():
                logits = self.loaded.model(torch.cat([x for x in inputs if x is not None])).float()
            pred = logits.argmax(dim=1)  # as LoadedModel.predict, not the argmax of rounded probabilities
            probs = torch.softmax(logits.double(), dim=1)
            label[ok] = pred.numpy()
            confidence[ok] = probs.gather(1, pred[:, None])[:, 0].numpy()
        classes = self.loaded.classes
        out = {k: v for k, v in batch.items() if k != "bytes"}
        out.update(label=label, confidence=confidence, ok=ok,
                   **{"class": np.asarray([classes[i] if i >= 0 else "" for i in label], dtype=object)})
        return out


# -- the run -----------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "x"


def model_name(model_uri: str) -> str:
    """A short name for the model in output names: its directory's, with the run's when that is
    just ``model`` (``searches/<run>/model`` -> ``<run>-model``)."""
    parts = [p for p in model_uri.rstrip("/").split("/") if p]
    if parts and parts[-1] in ("model.json", "model.pt"):
        parts = parts[:-1]
    name = parts[-1] if parts else "model"
    if name == "model" and len(parts) > 1:
        name = f"{parts[-2]}-model"
    return _safe(name)


def output_target(out: str | None, storage: Storage, default_name: str) -> tuple[Storage, str]:
    """``(storage, relative path)`` to write the predictions to."""
    if not out:
        return storage, f"predictions/{default_name}"
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
        if os.path.isdir(out):
            return Storage(out), default_name
    parent, name = posixpath.split(out.rstrip("/"))
    if not name or parent in ("", "s3:", "s3:/"):
        raise StorageError(f"--out {out}: give a file path such as s3://bucket/predictions.parquet")
    return Storage(parent), name


def _collect(ds) -> pa.Table:
    tables = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def run_predictions(model_uri: str, source: Source, batch_size: int, concurrency: int | None,
                    cpus_per_actor: float) -> tuple[pa.Table, list[str], float]:
    """Label ``source`` on Ray Data; returns ``(predictions table, skipped paths, seconds)``."""
    from jobs import runtime

    runtime.init_ray()
    import ray.data  # binds `ray` too

    # Ray Data's periodic progress log (every 10 s when stdout is not a terminal) drowns the
    # job's own lines: keep its warnings and errors. Its progress bars still show on a terminal.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    batches = max(1, math.ceil(source.size / batch_size))
    if concurrency is None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        concurrency = max(1, int(cpus // cpus_per_actor))
    concurrency = min(concurrency, batches)  # no actor without a batch to do
    threads = max(1, int(cpus_per_actor))
    print(f"[predict] {source.describe()} on {concurrency} actor(s) x {threads} thread(s), batch {batch_size}",
          flush=True)
    t0 = time.perf_counter()
    # The reads are I/O and ask for no CPU: with CPU-holding reads, an actor pool that holds every
    # CPU of the cluster (the default on one node) would leave them unscheduled and hang.
    blocks = min(source.size, max(2 * concurrency, batches))
    if source.kind == "files":
        ds = ray.data.read_binary_files(source.paths, filesystem=source.fs, include_paths=True,
                                        override_num_blocks=blocks, num_cpus=0)
    else:
        chunk = max(batch_size, math.ceil(source.rows / blocks))
        items = task_chunks(source, chunk)
        prefix = f"{source.task}/{source.split}"
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_task_chunk, batch_size=1, fn_kwargs={"storage": source.storage, "prefix": prefix}, num_cpus=0)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": model_uri, "threads": threads},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_cpus=cpus_per_actor)
    table = _collect(ds)
    seconds = time.perf_counter() - t0
    if table.num_rows != source.size:
        raise RuntimeError(f"Ray Data returned {table.num_rows} results for {source.size} images")
    ok = table.column("ok").to_numpy(zero_copy_only=False)
    paths = table.column("path").to_pylist()
    skipped = sorted(p for p, good in zip(paths, ok) if not good)
    table = table.filter(pa.array(ok)).drop_columns(["ok"])
    if source.kind == "task":
        table = table.sort_by("row").drop_columns(["row"])
    else:
        if isinstance(source.fs, pafs.S3FileSystem):  # Ray Data reports paths without the scheme
            table = table.set_column(table.schema.get_field_index("path"), "path",
                                     pa.array([f"s3://{p}" for p in table.column("path").to_pylist()], pa.string()))
            skipped = [f"s3://{p}" for p in skipped]
        table = table.sort_by("path")
    columns = ["path", "label", "class", "confidence"] + (["true_label"] if source.kind == "task" else [])
    schema = pa.schema([("path", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                        ("confidence", pa.float64()), ("true_label", pa.int64())])
    table = table.select(columns).cast(pa.schema([schema.field(c) for c in columns]))
    return table, skipped, seconds


def predict(model: str, dataset: str, out: str | None = None, root: str | None = None, split: str | None = None,
            batch_size: int = 128, concurrency: int | None = None, cpus_per_actor: float = 1.0) -> PredictReport:
    """Label ``dataset`` with the exported ``model`` and write the predictions; see the module doc.

    Everything a user can get wrong (the model, the dataset, the output place) is checked before
    Ray starts; nothing is written unless every image went through.
    """
    from tans.selection.export import load_model

    storage = Storage(root or None)
    model_uri = model_location(model, root)
    loaded = load_model(model_uri)  # ModelLoadError (one line) before any actor starts
    model_uri = loaded.uri
    source = resolve_dataset(dataset, storage, split)
    target, rel = output_target(out, storage, f"{model_name(model_uri)}-{_safe(source.name)}.parquet")
    print(f"[predict] model {model_uri}: {loaded.family}, {loaded.num_classes} classes, "
          f"{loaded.image_size}px x{loaded.channels}", flush=True)
    table, skipped, seconds = run_predictions(model_uri, source, batch_size, concurrency, cpus_per_actor)
    if table.num_rows == 0:
        raise IngestError(f"{source.uri}: none of its {source.size} file(s) is a readable image; nothing written")
    accuracy = None
    if source.kind == "task":
        pred, true = table.column("label").to_numpy(), table.column("true_label").to_numpy()
        accuracy = float(np.mean(pred == true))
    meta = {"model": model_uri, "dataset": dataset, "source": source.uri, "kind": source.kind,
            "split": source.split or None, "images": table.num_rows, "skipped": len(skipped),
            "skipped_examples": skipped[:SKIPPED_KEPT], "accuracy": accuracy, "classes": loaded.classes,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    target.write_parquet(rel, table)
    return PredictReport(table=table, out=target.uri_of(rel), skipped=skipped, seconds=seconds, accuracy=accuracy)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tans predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model dir (local, s3://, or under the root)")
    parser.add_argument("--dataset", required=True,
                        help="image directory (local or s3://, recursive), or task:<name> / a task name in the root")
    parser.add_argument("--split", choices=SPLITS, help="split of a task (default: test)")
    parser.add_argument("--out", help="output Parquet file (default: <root>/predictions/<model>-<dataset>.parquet)")
    parser.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--batch-size", type=_positive(int), default=128, help="images per inference batch [128]")
    parser.add_argument("--concurrency", type=_positive(int),
                        help="actors in the pool (default: the cluster's CPUs / --cpus-per-actor)")
    parser.add_argument("--cpus-per-actor", type=_positive(float), default=1.0,
                        help="CPUs per actor, also its torch threads [1]")
    args = parser.parse_args(argv)
    from tans.selection.export import ModelLoadError

    try:
        report = predict(args.model, args.dataset, args.out, args.root, args.split, args.batch_size,
                         args.concurrency, args.cpus_per_actor)
    except ModelLoadError as exc:  # not one of jobs._common's user errors (yet): same contract here
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if report.skipped:
        shown = ", ".join(report.skipped[:SKIPPED_SHOWN]) + (", ..." if len(report.skipped) > SKIPPED_SHOWN else "")
        print(f"[predict] skipped {len(report.skipped)} unreadable file(s): {shown}")
    print(f"[predict] {report.table.num_rows} images labelled in {report.seconds:.1f}s")
    if report.accuracy is not None:
        print(f"[predict] accuracy {report.accuracy:.4f} on {report.table.num_rows} images")
    print(f"[predict] written to {report.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
