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
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_writer("new.txt") as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer("keep.txt") as f:
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
