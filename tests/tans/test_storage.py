"""The storage root: the same tests on a local directory and on a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pyarrow as pa
import pytest

from tans.storage import Storage, StorageError, default_root
from tests.conftest import run_cli

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    server = request.getfixturevalue("s3_env")
    bucket = server.make_bucket(f"tans-{uuid.uuid4().hex[:8]}")
    return Storage(f"s3://{bucket}/prefix")


@pytest.mark.timeout(120)
def test_round_trip_bytes_json_parquet(storage):
    storage.write_bytes("a/b/raw.bin", b"\x00\x01hello")
    storage.write_json("a/meta.json", {"x": [1, 2], "y": "z"})
    table = pa.table({"image": [b"p1", b"p2"], "label": [0, 1]})
    storage.write_parquet("a/b/part-0.parquet", table)

    assert storage.read_bytes("a/b/raw.bin") == b"\x00\x01hello"
    assert storage.read_json("a/meta.json") == {"x": [1, 2], "y": "z"}
    assert storage.read_parquet("a/b/part-0.parquet").equals(table)
    assert storage.list("a") == ["a/b", "a/meta.json"]
    assert storage.list_files("a", suffix=".parquet") == ["a/b/part-0.parquet"]
    assert storage.is_file("a/meta.json") and not storage.is_file("a/b")
    # overwrite replaces whole content
    storage.write_json("a/meta.json", {"x": 3})
    assert storage.read_json("a/meta.json") == {"x": 3}
    storage.delete("a/b")
    assert not storage.exists("a/b/raw.bin") and storage.exists("a/meta.json")


@pytest.mark.timeout(120)
def test_interrupted_write_leaves_no_file(storage):
    storage.write_text("keep.txt", "old")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_writer("new.txt") as f:
        f.write(b"half of it")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), storage.atomic_writer("keep.txt") as f:
        f.write(b"replacement that never commits")
        raise RuntimeError("boom")
    assert not storage.exists("new.txt")
    assert storage.read_bytes("keep.txt") == b"old"
    assert storage.list() == ["keep.txt"]


@pytest.mark.timeout(120)
def test_killed_writer_leaves_no_visible_file(storage, tmp_path):
    """A process killed in the middle of writing a big file leaves nothing a reader would see."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from tans.storage import Storage
        st = Storage({storage.uri!r})
        with st.atomic_writer("big.bin") as f:
            f.write(b"x" * 1_000_000)
            os.kill(os.getpid(), signal.SIGKILL)  # dies before the commit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), timeout=60)
    assert proc.returncode == -9
    assert not storage.exists("big.bin")
    assert "big.bin" not in storage.list()


@pytest.mark.timeout(60)
def test_missing_file_is_a_clear_error(storage):
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes("nope.json")
    assert storage.list("nowhere") == []
    storage.delete("nowhere")  # deleting what is not there is fine


@pytest.mark.timeout(30)
def test_paths_cannot_escape_the_root(tmp_path):
    st = Storage(str(tmp_path / "r"))
    with pytest.raises(StorageError, match="escapes"):
        st.write_text("../outside.txt", "x")
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.timeout(30)
def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TANS_ROOT", str(tmp_path / "env-root"))
    assert default_root() == str(tmp_path / "env-root")
    assert Storage().uri == str(tmp_path / "env-root")
    monkeypatch.delenv("TANS_ROOT")
    assert default_root() == os.path.expanduser("~/.cache/tans")


@pytest.mark.timeout(30)
def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        Storage("gs://bucket/x")


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_missing_bucket_and_refused_credentials_are_one_line_errors(s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        Storage("s3://no-such-bucket/tans")
    bucket = s3_env.make_bucket(f"tans-{uuid.uuid4().hex[:8]}")
    # As a user meets them: a stage's command line, in a fresh process (no bucket check cached).
    cases = {
        "missing bucket": ({}, "s3://no-such-bucket/tans", "bucket 'no-such-bucket' does not exist"),
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, f"s3://{bucket}/tans", "ACCESS_DENIED"),
    }
    for what, (env, root, needle) in cases.items():
        proc = run_cli("search", "--root", root, "--dataset", "x", env={**s3_env.env(), **env}, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (what, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (what, proc.stderr)
    assert s3_env.client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # nothing written
