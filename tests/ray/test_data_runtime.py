"""Ray glue of the data stage: Ray Data reads tasks and shards them; large ingests decode on Ray."""

from __future__ import annotations

import numpy as np
import pytest

from tans.data.ingest import decode_in_process, ingest_imagefolder, list_imagefolder
from tans.data.tasks import read_split
from tans.storage import Storage
from tests.conftest import make_imagefolder, run_cli


@pytest.mark.timeout(180)
def test_task_dataset_reads_and_shards(ray_local, tmp_path):
    from jobs import runtime

    src = make_imagefolder(tmp_path / "src", {"a": 10, "b": 10, "c": 10})
    st = Storage(str(tmp_path / "root"))
    ingest_imagefolder(st, str(src), "abc", image_size=8, part_rows=7)
    ds = runtime.task_dataset(st, "abc", "train")
    rows = ds.take_all()
    expected = read_split(st, "abc", "train")
    assert len(rows) == expected.num_rows == 24
    assert sorted(r["label"] for r in rows) == sorted(expected.column("label").to_pylist())
    assert sorted(bytes(r["image"]) for r in rows) == sorted(expected.column("image").to_pylist())

    # streaming_split feeds its shards in lock-step, so (like train workers) consume them concurrently
    from concurrent.futures import ThreadPoolExecutor

    shards = ds.streaming_split(2, equal=True)

    def consume(shard):
        return [bytes(img) for b in shard.iter_batches(batch_size=4) for img in b["image"]]

    with ThreadPoolExecutor(2) as pool:
        seen = list(pool.map(consume, shards))
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.timeout(180)
def test_ray_data_decode_matches_in_process(ray_local, tmp_path):
    from jobs import runtime

    src = make_imagefolder(tmp_path / "src", {"a": 6, "b": 6})
    (src / "a" / "bad.png").write_bytes(b"nope")
    listing = list_imagefolder(str(src))
    paths = [p for f in listing.files for p in f]
    local = decode_in_process(listing.fs, paths, 12)
    remote = runtime.decode_with_ray_data(listing.fs, paths, 12)
    assert [d.rgb for d in remote] == [d.rgb for d in local]
    assert [d.grey for d in remote] == [d.grey for d in local]
    assert sum(d.rgb is None for d in remote) == 1


@pytest.mark.timeout(300)
def test_cli_large_ingest_goes_through_ray_data(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 8, "b": 8})
    root = tmp_path / "root"
    proc = run_cli("data", "ingest", str(src), "--name", "big", "--root", str(root), "ray_min_images=1", timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "ray-data" in proc.stdout
    st = Storage(str(root))
    ref = Storage(str(tmp_path / "ref"))
    ingest_imagefolder(ref, str(src), "big")
    for split in ("train", "test"):
        a, b = read_split(st, "big", split), read_split(ref, "big", split)
        assert a.column("image").to_pylist() == b.column("image").to_pylist()
        assert np.array_equal(a.column("label").to_numpy(), b.column("label").to_numpy())
