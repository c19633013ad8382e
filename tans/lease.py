"""One writer per run: a lease file ``<run dir>/lease.json`` taken before a job writes a run.

A lease names its owner (host, pid, a random token) and carries a heartbeat that a background
thread refreshes every ``ttl_s / 4`` seconds. A second writer of the same run exits with one line
naming the owner. A lease is taken over when its owner is known dead (same host, pid gone) or its
heartbeat is older than ``ttl_s`` (an owner on another host that vanished).

Every change is a compare-and-swap, so two processes racing for a free or stale lease cannot both
win:

* local disk: creation is a hard link of a finished temp file (fails if the name exists); a
  replacement happens under an ``fcntl`` lock of a sidecar file, after checking the content.
* S3: ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match: <etag>`` (replace), which
  S3 and S3-compatible servers that implement conditional writes enforce (the test server does;
  ``tests/tans/test_lease.py`` shows it). A server that ignores them would let a racing taker
  through; the holder notices at its next heartbeat (the token is no longer its own) and stops.

A holder that finds its lease gone or owned by someone else marks it ``lost``; jobs check
:meth:`Lease.check` before their final writes, so a run never ends with two writers' reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from tans.storage import Storage, StorageError

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 60.0


class LeaseHeld(StorageError):
    """Another live writer holds the run (one line naming it)."""


class LeaseLost(StorageError):
    """This process's lease was taken over while it was writing."""


def _now() -> float:
    return time.time()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


# -- the two backends: create-if-absent and replace-if-unchanged, plus read and delete -------------


class _LocalBackend:
    def __init__(self, storage: Storage, rel: str):
        import tempfile

        self.path = storage.path(rel)
        # The flock's file lives outside the run, so the run folder holds nothing but its artifacts.
        key = hashlib.sha256(self.path.encode()).hexdigest()[:20]
        self.lock_path = os.path.join(tempfile.gettempdir(), f"tans-lease-{key}.lock")

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lease exists
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def replace(self, data: bytes, etag: str) -> bool:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != etag:
                return False
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return True

    def delete(self, etag: str) -> None:
        import fcntl

        with contextlib.suppress(FileNotFoundError), open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is not None and current[1] == etag:
                os.remove(self.path)
                with contextlib.suppress(OSError):  # a run that wrote nothing leaves no folder behind
                    os.rmdir(os.path.dirname(self.path))


class _S3Backend:
    def __init__(self, storage: Storage, rel: str):
        import boto3
        from botocore.config import Config

        from tans.storage import s3_endpoint

        self.bucket, _, self.key = storage.path(rel).partition("/")
        endpoint = s3_endpoint()
        if endpoint and "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        self.client = boto3.client("s3", endpoint_url=endpoint or None,
                                   region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                                   or "us-east-1", config=Config(connect_timeout=10, read_timeout=10,
                                                                 retries={"max_attempts": 3}))

    def _precondition_failed(self, exc) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    def read(self) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]

    def create(self, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if self._precondition_failed(exc):
                return False
            raise

    def replace(self, data: bytes, etag: str) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfMatch=etag)
            return True
        except Exception as exc:
            if self._precondition_failed(exc):
                return False
            raise

    def delete(self, etag: str) -> None:
        current = self.read()
        if current is not None and current[1] == etag:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


# -- the lease -----------------------------------------------------------------------------------


class Lease:
    """``with Lease(storage, "spaces/local", what="train-space"):`` - hold the run while writing it."""

    def __init__(self, storage: Storage, run_dir: str, what: str = "", ttl_s: float = DEFAULT_TTL_S):
        self.storage, self.run_dir, self.what, self.ttl_s = storage, run_dir.strip("/"), what, ttl_s
        self.rel = f"{self.run_dir}/{LEASE_FILE}"
        self.backend = _LocalBackend(storage, self.rel) if storage.is_local else _S3Backend(storage, self.rel)
        self.token = uuid.uuid4().hex
        self.etag = ""
        self.lost = False
        self.took_over: dict | None = None
        self.since = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- content ---------------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "what": self.what, "since": self.since, "heartbeat": _now(), "ttl_s": self.ttl_s}).encode()

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            obj = json.loads(data)
            return obj if isinstance(obj, dict) else {}
        except ValueError:
            return {}  # a damaged lease is nobody's: it is stale

    def _stale(self, owner: dict) -> str:
        """Why ``owner``'s lease may be taken over ("" = it may not)."""
        if not owner.get("token"):
            return "unreadable lease"
        if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1))):
            return f"its owner pid {owner.get('pid')} on this host is gone"
        age = _now() - float(owner.get("heartbeat", 0))
        if age > float(owner.get("ttl_s", self.ttl_s)):
            return f"its heartbeat is {age:.0f}s old"
        return ""

    def describe(self, owner: dict) -> str:
        age = _now() - float(owner.get("heartbeat", 0))
        since = datetime.fromtimestamp(float(owner.get("since", 0)), UTC).isoformat(timespec="seconds")
        what = f" ({owner['what']})" if owner.get("what") else ""
        return f"pid {owner.get('pid')} on {owner.get('host')}{what}, since {since}, heartbeat {age:.0f}s ago"

    # -- acquire / release -------------------------------------------------------------------------
    def acquire(self) -> Lease:
        for _ in range(5):  # a lost race re-reads; a few rounds settle any interleaving
            data = self._record()
            if self.backend.create(data):
                self.etag = self._written_etag()
                return self._started()
            current = self.backend.read()
            if current is None:
                continue  # released between our create and read: try again
            owner = self._parse(current[0])
            reason = self._stale(owner)
            if not reason:
                raise LeaseHeld(f"{self.storage.uri_of(self.run_dir)} is being written by {self.describe(owner)}; "
                                f"wait for it, or remove {self.storage.uri_of(self.rel)} if that process is gone")
            if self.backend.replace(data, current[1]):
                self.etag = self._written_etag()
                self.took_over = {**owner, "reason": reason}
                print(f"[lease] took over {self.storage.uri_of(self.rel)}: {reason}", flush=True)
                return self._started()
        raise LeaseHeld(f"{self.storage.uri_of(self.run_dir)}: another writer keeps taking the lease; try again")

    def _written_etag(self) -> str:
        """The etag of the lease file this process has just written."""
        current = self.backend.read()
        if current is None:
            raise LeaseLost(f"{self.storage.uri_of(self.rel)}: removed by another process right after it was written")
        return current[1]

    def _started(self) -> Lease:
        # The content we wrote is ours; re-read it so a server that ignored a condition is caught now.
        self._verify()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_dir}", daemon=True)
        self._thread.start()
        return self

    def _verify(self) -> bool:
        current = self.backend.read()
        if current is not None and self._parse(current[0]).get("token") == self.token:
            self.etag = current[1]
            return True
        self.lost = True
        return False

    def _beat(self) -> None:
        interval = max(0.05, self.ttl_s / 4)
        while not self._stop.wait(interval):
            try:
                if not self._verify():
                    print(f"[lease] lost {self.storage.uri_of(self.rel)} to another writer", flush=True)
                    return
                if not self.backend.replace(self._record(), self.etag):
                    continue  # changed under us: the next round's verify decides
                self._verify()
            except Exception as exc:  # a flaky store: keep trying; the TTL is generous
                print(f"[lease] heartbeat of {self.storage.uri_of(self.rel)} failed: {exc}", flush=True)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another writer took the run over (call before final writes)."""
        if self.lost or not self._verify():
            raise LeaseLost(f"{self.storage.uri_of(self.run_dir)}: another writer took this run over; "
                            "stopping without writing its results")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost and self.etag:
            with contextlib.suppress(Exception):
                self.backend.delete(self.etag)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
