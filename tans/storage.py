"""The storage root: a local directory or ``s3://bucket/prefix``, reached through ``pyarrow.fs``.

Every artifact of every stage lives under one root (layout in the README, "Storage root"). Writes are atomic:

* locally, bytes go to a hidden temp file beside the target, are fsynced, then renamed;
* on S3, the whole object is buffered and sent as one upload that S3 only makes visible once it
  completes, so a killed job leaves no object at all.

Readers therefore never see a half-written file. Temp names start with ``.tmp-`` and listing
skips them.

The root defaults to ``$TANS_ROOT``, else ``~/.cache/tans``. For S3, the endpoint and
credentials come from the usual AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) plus ``AWS_ENDPOINT_URL`` (or ``TANS_S3_ENDPOINT``)
for S3-compatible servers; never from a file in the repository.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tans import paths

TMP_PREFIX = ".tmp-"
DEFAULT_ROOT = "~/.cache/tans"


_CHECKED_BUCKETS: set[tuple[str, str]] = set()  # (endpoint, bucket) pairs known to exist


class StorageError(RuntimeError):
    """A storage root that cannot be reached or a path that is not there (one-line message)."""


class CorruptArtifact(StorageError):
    """A file that exists but cannot be parsed (truncated, garbage): names it and how to rebuild it."""


# First path component under the root -> the command that rebuilds what lives there (one entry
# per top-level folder of tans.paths; a search's export lives under its search folder).
REBUILD_COMMANDS = {
    paths.TASKS: "`tans data ingest SRC --force` (or `tans demo` for the built-in tasks)",
    paths.SUPERNETS: "`tans build-zoo --config CFG --force`",
    paths.ZOO: "`tans build-zoo --config CFG` (a corrupt part is rebuilt on the next run)",
    paths.QUERIES: "`tans train-space --config CFG queries.force=true`",
    paths.SPACES: "`tans train-space --config CFG --force`",
    paths.SEARCHES: "`tans search ... --force` (the winner is exported again)",
    paths.EVALUATIONS: "`tans evaluate ... --force`",
    paths.DEMO_DIR: "`tans demo` (it rewrites its table on every run)",
}


def rebuild_hint(rel: str) -> str:
    """The command that rebuilds the artifact at ``rel`` (a phrase for error messages)."""
    stage = rel.strip("/").split("/", 1)[0]
    return REBUILD_COMMANDS.get(stage, "the command that wrote it")


def new_generation() -> str:
    """A fresh generation folder name (``g-`` + 8 hex digits): where a ``--force`` rebuild writes
    beside the finished artifact until its marker file swaps it in."""
    return f"g-{uuid.uuid4().hex[:8]}"


def default_root() -> str:
    """``$TANS_ROOT`` if set, else ``~/.cache/tans`` (expanded)."""
    return os.environ.get("TANS_ROOT") or os.path.expanduser(DEFAULT_ROOT)


def s3_endpoint() -> str:
    """The S3 endpoint from the environment ("" = AWS itself)."""
    return (os.environ.get("TANS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "")


def s3_filesystem(timeout_s: float = 10.0) -> pafs.S3FileSystem:
    """An ``S3FileSystem`` configured from the environment, with bounded timeouts."""
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {
        "connect_timeout": timeout_s,
        "request_timeout": timeout_s,
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs["force_virtual_addressing"] = False
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI (local path, ``file://`` or ``s3://``) to ``(filesystem, path_in_filesystem)``."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, e.g. s3://my-bucket/tans")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


class Storage:
    """Reads and writes paths relative to one storage root.

    ``Storage("s3://bucket/tans")`` or ``Storage("/data/tans")``; ``Storage()`` uses
    :func:`default_root`. Relative paths use ``/`` (``"tasks/fashion_0_5/task.json"``).
    """

    def __init__(self, root: str | None = None):
        self.uri = (root or default_root()).rstrip("/") or "/"
        self.fs, self.base = resolve_filesystem(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.is_local:
            os.makedirs(self.base, exist_ok=True)
        else:
            self._check_bucket()

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):
        # pyarrow filesystems pickle, but re-resolving keeps env-based credentials fresh on workers.
        return (Storage, (self.uri,))

    # -- paths -----------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (which must stay inside the root)."""
        rel = rel.strip("/")
        norm = posixpath.normpath(rel) if rel else ""
        if norm == ".." or norm.startswith("../") or norm.startswith("/"):
            raise StorageError(f"{rel}: path escapes the storage root")
        return posixpath.join(self.base, norm) if norm not in ("", ".") else self.base

    def _inner_path(self, rel: str, action: str) -> str:
        """``path(rel)`` for a write or delete, which may never touch the root itself."""
        full = self.path(rel)
        if full == self.base:
            raise StorageError(f"refusing to {action} the storage root {self.uri} itself (path {rel!r})")
        return full

    def uri_of(self, rel: str) -> str:
        """The full URI of ``rel`` (``s3://...`` or an absolute local path)."""
        return f"{self.uri}/{rel.strip('/')}" if rel.strip("/") else self.uri

    # -- queries ---------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Relative paths under ``rel`` (files and directories), sorted, temp files skipped."""
        if self._info(rel).type != pafs.FileType.Directory:
            return []
        selector = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        out = []
        for info in self._call(lambda: self.fs.get_file_info(selector), rel):
            name = posixpath.relpath(info.path, self.base)
            if any(part.startswith(TMP_PREFIX) for part in name.split("/")):
                continue
            out.append(name)
        return sorted(out)

    def list_files(self, rel: str = "", suffix: str = "") -> builtins.list[str]:  # list: the method above
        """Files (recursively) under ``rel`` whose names end with ``suffix``."""
        return [p for p in self.list(rel, recursive=True) if p.endswith(suffix) and self.is_file(p)]

    # -- reads -----------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        if not self.is_file(rel):
            raise StorageError(f"{self.uri_of(rel)}: no such file")
        with self._call(lambda: self.fs.open_input_stream(self.path(rel)), rel) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.corrupt(rel, f"not valid JSON ({exc.__class__.__name__})") from None

    def read_parquet(self, rel: str, columns: builtins.list[str] | None = None) -> pa.Table:
        if not self.is_file(rel):
            raise StorageError(f"{self.uri_of(rel)}: no such file")
        try:
            return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise self.corrupt(rel, f"not a readable Parquet file ({first})") from None

    def read_torch(self, rel: str) -> Any:
        """A ``torch.save``d state dict, loaded with ``weights_only=True`` on the CPU."""
        import torch  # here, so that light commands never import torch

        data = self.read_bytes(rel)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise self.corrupt(rel, f"not a readable checkpoint ({first})") from None

    def corrupt(self, rel: str, what: str) -> CorruptArtifact:
        """The one-line error for a damaged file: which file, what is wrong, what rebuilds it."""
        return CorruptArtifact(f"{self.uri_of(rel)}: {what}; it is truncated or corrupt - rebuild it with "
                               f"{rebuild_hint(rel)}")

    # -- atomic writes ---------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_writer(self, rel: str) -> Iterator[io.BytesIO]:
        """Yield a buffer; its content becomes ``rel`` only if the block exits normally."""
        buf = io.BytesIO()
        yield buf
        self._commit(rel, buf.getvalue())

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._commit(rel, data)

    def write_text(self, rel: str, text: str) -> None:
        self._commit(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self._commit(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        with self.atomic_writer(rel) as buf:
            pq.write_table(table, buf)

    def _commit(self, rel: str, data: bytes) -> None:
        final = self._inner_path(rel, "overwrite")
        if self.is_local:
            directory = posixpath.dirname(final)
            os.makedirs(directory, exist_ok=True)
            tmp = posixpath.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)  # atomic on POSIX
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            # One stream, written in one call and closed: pyarrow sends a single PUT (or a
            # multipart upload completed at close), and S3 shows the object only once complete.
            def put() -> None:
                with self.fs.open_output_stream(final) as out:
                    out.write(data)

            self._call(put, rel)

    # -- deletes ---------------------------------------------------------------------------
    def delete(self, rel: str) -> None:
        """Delete a file or a whole directory; missing paths are fine. Never the root itself."""
        full = self._inner_path(rel, "delete")
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self._call(lambda: self.fs.delete_dir(full), rel)
        elif info.type == pafs.FileType.File:
            self._call(lambda: self.fs.delete_file(full), rel)

    # -- helpers ---------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        """Fail with one line if the bucket is missing or the credentials are refused.

        Without it a missing bucket reads as "no such file" everywhere (and some S3 servers
        create buckets on the first write), which sends a user looking for the wrong mistake.
        One HEAD per bucket and process.
        """
        bucket = self.base.split("/", 1)[0]
        key = (s3_endpoint(), bucket)
        if key in _CHECKED_BUCKETS:
            return
        info = self._call(lambda: self.fs.get_file_info(bucket), "")
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: bucket '{bucket}' does not exist (create it first, "
                               f"e.g. `aws s3 mb s3://{bucket}`)")
        _CHECKED_BUCKETS.add(key)

    def _info(self, rel: str) -> pafs.FileInfo:
        return self._call(lambda: self.fs.get_file_info(self.path(rel)), rel)

    def _call(self, fn, rel: str):
        try:
            return fn()
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"{self.uri_of(rel)}: {first}") from exc
