"""Where the jobs meet Ray: starting/connecting, Ray Data readers and fan-out over the library.

It sits in ``jobs/``, not in the library, so ``tans/`` holds no Ray code at all.

* :func:`init_ray` connects to ``RAY_ADDRESS`` when set (a cluster, or ``ray job submit``),
  else starts an embedded single-node Ray whose listeners stay on 127.0.0.1.
* :func:`task_dataset` is a task split as a Ray Dataset (``read_parquet`` through the storage
  root's filesystem) - the form Ray Train shards into workers with ``streaming_split``.
* :func:`decode_with_ray_data` decodes a large ImageFolder with ``map_batches``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow.fs as pafs

from tans.data.ingest import DecodedImage, decode_image_bytes
from tans.data.tasks import read_task_info, task_dir
from tans.storage import Storage


def init_ray(num_cpus: int | None = None, quiet: bool = True):
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray bound to 127.0.0.1.

    A ``RAY_ADDRESS`` that cannot be reached (nothing listens there, or it is the dashboard's
    ``http://`` address) fails within ``$TANS_RAY_CONNECT_TIMEOUT_S`` seconds (default 5) with
    a one-line :class:`~tans.storage.StorageError`, instead of Ray's long retry loop.
    """
    import socket

    from tans.storage import StorageError

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # An embedded node: keep every listener on loopback. Ray
        # reads this flag when it is imported; without it, it binds the machine's public address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return ray
    if address:
        if address.startswith(("http://", "https://")):
            raise StorageError(
                f"RAY_ADDRESS={address} is a dashboard (job submission) address: submit this with "
                "`ray job submit -- python -m jobs...`, or set RAY_ADDRESS to the cluster's GCS address host:port"
            )
        target = address.removeprefix("ray://")
        if target not in ("auto", "local"):
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit():
                raise StorageError(f"RAY_ADDRESS={address}: expected host:port (or ray://host:port, auto, local)")
            timeout = float(os.environ.get("TANS_RAY_CONNECT_TIMEOUT_S", "5"))
            try:
                socket.create_connection((host, int(port)), timeout=timeout).close()
            except OSError as exc:
                timed_out = isinstance(exc, TimeoutError)
                reason = f"no answer within {timeout:g}s" if timed_out else (exc.strerror or str(exc))
                raise StorageError(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({reason.lower()}): "
                    "start it, fix the address, or unset RAY_ADDRESS to run on a local Ray"
                ) from None
        ray.init(log_to_driver=not quiet)
    else:
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            # ray was imported before the flag was set (it reads it once, at import)
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    return ray


def task_dataset(storage: Storage, task: str, split: str):
    """One split of ``task`` as a ``ray.data.Dataset`` with columns ``image`` and ``label``."""
    import ray.data

    info = read_task_info(storage, task)
    paths = [storage.path(f"{task_dir(task)}/{split}/{p}") for p in info.parts[split]]
    return ray.data.read_parquet(paths, filesystem=storage.fs)


def decode_with_ray_data(fs: pafs.FileSystem, paths: Sequence[str], image_size: int) -> list[DecodedImage]:
    """Decode ``paths`` on Ray Data (read_binary_files -> map_batches); results in input order."""
    import pandas as pd
    import ray.data

    order = {p: i for i, p in enumerate(paths)}

    def decode_batch(batch: pd.DataFrame) -> pd.DataFrame:
        out = [decode_image_bytes(b, image_size) for b in batch["bytes"]]
        return pd.DataFrame(
            {
                "path": batch["path"],
                "rgb": [d.rgb for d in out],
                "grey": [d.grey for d in out],
            }
        )

    ds = ray.data.read_binary_files(list(paths), filesystem=fs, include_paths=True)
    results: list[DecodedImage | None] = [None] * len(paths)
    decoded = ds.map_batches(decode_batch, batch_format="pandas", batch_size=256)
    for batch in decoded.iter_batches(batch_format="pandas", batch_size=1024):
        for path, rgb, grey in zip(batch["path"], batch["rgb"], batch["grey"]):
            # Ray Data reports paths without a scheme; match on the filesystem path.
            idx = order.get(path)
            if idx is None:
                idx = order[next(p for p in order if p.endswith(path) or path.endswith(p))]
            # pandas turns None into NA in binary columns: anything but bytes means "no image"
            results[idx] = DecodedImage(_as_bytes(rgb), _as_bytes(grey))
    missing = [p for p, r in zip(paths, results) if r is None]
    if missing:
        raise RuntimeError(f"Ray Data returned no result for {len(missing)} file(s), e.g. {missing[0]}")
    return results  # type: ignore[return-value]


def _as_bytes(value) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def materialise_builtin_with_ray(
    storage_uri: str, specs: list, image_size: int, force: bool, part_rows: int, config: dict
):
    """Materialise built-in tasks as parallel Ray tasks; yields ``(spec, report_or_error)``."""
    import ray

    @ray.remote(num_cpus=1)
    def one(spec):
        from tans.data.builtin.catalog import materialise
        from tans.data.ingest import IngestError

        try:
            return spec, materialise(Storage(storage_uri), spec, image_size, force, part_rows, config=config)
        except IngestError as exc:
            return spec, exc

    pending = [one.remote(s) for s in specs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
