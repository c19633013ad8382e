"""Ingest of ImageFolders: round trip, and every bad input ends in one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tans.data.ingest import IngestError, ingest_imagefolder
from tans.data.reader import iter_batches, load_task_tensors
from tans.data.tasks import decode_png, read_split, read_task_info
from tans.storage import Storage
from tests.conftest import make_imagefolder, run_cli


@pytest.mark.timeout(60)
def test_imagefolder_round_trip(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"cat": 12, "dog": 9, "emu": 7}, size=20)
    st = Storage(str(tmp_path / "root"))
    report = ingest_imagefolder(st, str(src), "pets", image_size=16, test_fraction=0.25, seed=1, part_rows=5)

    info = read_task_info(st, "pets")
    assert info.classes == ["cat", "dog", "emu"]
    assert info.image_size == 16 and info.channels == 3
    assert info.counts["train"] + info.counts["test"] == 28
    # stratified, seeded split: ceil(0.25 * n) per class in test
    assert info.class_counts["test"] == [3, 3, 2]
    assert info.class_counts["train"] == [9, 6, 5]
    assert len(info.parts["train"]) == 4  # 20 rows in parts of 5
    train = read_split(st, "pets", "train")
    labels = np.array(train.column("label").to_pylist())
    assert np.bincount(labels).tolist() == [9, 6, 5]
    # the pixels carry the class: class c has mean level 30 + 60c
    for png, lab in zip(train.column("image").to_pylist(), labels):
        arr = decode_png(png)
        assert arr.shape == (16, 16, 3)
        assert abs(arr.mean() - (30 + 60 * lab)) < 10
    assert report.skipped == {"cat": 0, "dog": 0, "emu": 0}

    # the same seed gives the same split
    st2 = Storage(str(tmp_path / "root2"))
    ingest_imagefolder(st2, str(src), "pets", image_size=16, test_fraction=0.25, seed=1)
    assert (
        read_split(st2, "pets", "test").column("image").to_pylist()
        == read_split(st, "pets", "test").column("image").to_pylist()
    )

    # the reader yields normalised 3-channel tensors in shards
    data = load_task_tensors(st, "pets", "train", image_size=24, channels=3)
    assert tuple(data.images.shape) == (20, 3, 24, 24)
    batches = list(iter_batches(data, batch_size=4, shuffle=True, seed=0, rank=1, world_size=2, drop_last=True))
    assert sum(len(y) for _, y in batches) == 8 and all(x.shape[0] == 4 for x, _ in batches)
    assert float(batches[0][0].min()) >= -1.0 and float(batches[0][0].max()) <= 1.0


@pytest.mark.timeout(60)
def test_grey_folder_stays_grey_and_corrupt_files_are_skipped(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 6, "b": 6}, mode="L")
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "b" / "notes.txt").write_text("not an image")
    (src / "b" / ".DS_Store").write_bytes(b"\x00")
    st = Storage(str(tmp_path / "root"))
    report = ingest_imagefolder(st, str(src), "grey", image_size=0)
    info = read_task_info(st, "grey")
    assert info.channels == 1 and info.image_size == 20
    assert report.skipped == {"a": 1, "b": 1}
    assert info.counts["train"] + info.counts["test"] == 12
    assert "skipped 2 unreadable file(s): " in report.summary()
    # the summary names the files, so the user can find them
    assert str(src / "a" / "broken.png") in report.summary() and str(src / "b" / "notes.txt") in report.summary()


def _bomb_png(side: int = 20000) -> bytes:
    """A few-KB PNG whose header declares side x side pixels (1-bit, so making it is cheap)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.timeout(60)
def test_images_over_the_pixel_bound_are_skipped_before_decoding(tmp_path, monkeypatch, ledger):
    ledger.bad_input(5)
    from PIL import Image

    from tans.data.image_limits import ImageTooLarge, open_bounded

    bomb, huge = _bomb_png(12000), _bomb_png(20000)
    assert len(bomb) < 200_000
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ImageTooLarge, match="144,000,000 pixels is over the bound of 50,000,000"):
        open_bounded(bomb)
    with pytest.raises(ImageTooLarge, match="decompression bomb"):  # PIL's own check, met first
        open_bounded(huge)
    assert decoded == []  # refused from the header alone

    src = make_imagefolder(tmp_path / "src", {"a": 6, "b": 6})
    (src / "a" / "bomb.png").write_bytes(bomb)
    st = Storage(str(tmp_path / "root"))
    report = ingest_imagefolder(st, str(src), "bombed", image_size=16)
    assert report.skipped == {"a": 1, "b": 0} and (12000, 12000) not in decoded
    assert read_task_info(st, "bombed").counts["train"] + read_task_info(st, "bombed").counts["test"] == 12

    # the bound is configurable: here every 20 x 20 image of class b is over it
    monkeypatch.setenv("TANS_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(ImageTooLarge):
        open_bounded((src / "b" / "img_000.png").read_bytes())
    monkeypatch.setenv("TANS_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="TANS_MAX_IMAGE_PIXELS"):
        open_bounded(bomb)


def _bad(tmp_path, kind):
    src = tmp_path / "src"
    if kind == "missing":
        return str(tmp_path / "does-not-exist"), "no such directory"
    if kind == "empty":
        src.mkdir()
        return str(src), "empty"
    if kind == "file":
        src.write_text("x")
        return str(src), "not a directory"
    if kind == "one-class":
        make_imagefolder(src, {"only": 5})
        return str(src), "at least 2"
    if kind == "class-without-files":
        make_imagefolder(src, {"a": 5})
        (src / "b").mkdir()
        return str(src), "class 'b' has no files"
    if kind == "class-unreadable":
        make_imagefolder(src, {"a": 5})
        (src / "b").mkdir()
        for i in range(3):
            (src / "b" / f"x{i}.jpg").write_bytes(b"garbage")
        return str(src), "class 'b' has no readable image"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "empty", "file", "one-class", "class-without-files", "class-unreadable"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_imagefolder_writes_nothing(tmp_path, kind):
    src, message = _bad(tmp_path, kind)
    st = Storage(str(tmp_path / "root"))
    with pytest.raises(IngestError, match=message):
        ingest_imagefolder(st, src, "bad")
    assert not st.exists("tasks/bad")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, kind):
    src, message = _bad(tmp_path, kind)
    root = tmp_path / "root"
    proc = run_cli("data", "ingest", src, "--name", "bad", "--root", str(root), "--config", "configs/data/tiny.yaml")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (root / "tasks" / "bad").exists()


@pytest.mark.timeout(120)
def test_cli_existing_task_needs_force(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 4, "b": 4})
    root = tmp_path / "root"
    args = ("data", "ingest", str(src), "--name", "t", "--root", str(root), "--config", "configs/data/tiny.yaml")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "task t: 2 classes" in first.stdout
    before = (root / "tasks/t/task.json").read_text()
    again = run_cli(*args)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert (root / "tasks/t/task.json").read_text() == before  # untouched
    forced = run_cli(*args, "--force", "--image-size", "12")
    assert forced.returncode == 0, forced.stderr
    info = json.loads((root / "tasks/t/task.json").read_text())
    assert info["image_size"] == 12 and info["config"]["force"] is True


@pytest.mark.timeout(120)
def test_cli_config_errors_exit_2(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 4, "b": 4})
    proc = run_cli("data", "ingest", str(src), "--name", "t", "--config", "configs/data/tiny.yaml", "image_sise=32")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown key 'image_sise'" in proc.stderr and "configs/data/tiny.yaml" in proc.stderr
    proc = run_cli("data", "ingest", str(src), "--name", "t", "--test-fraction", "1.5")
    assert proc.returncode == 2 and "test_fraction" in proc.stderr
    proc = run_cli("data", "ingest", str(src), "--name", "../evil")
    assert proc.returncode == 1 and "invalid task name" in proc.stderr


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_imagefolder_from_s3_into_an_s3_root(tmp_path, s3_env):
    """SRC on S3 and the storage root on S3: the same task as from a local folder."""
    src = make_imagefolder(tmp_path / "src", {"a": 5, "b": 6})
    bucket = s3_env.make_bucket("ingest-src")
    for path in sorted(src.rglob("*.png")):
        s3_env.client.upload_file(str(path), bucket, f"folder/{path.relative_to(src)}")
    s3_env.make_bucket("ingest-root")
    remote = Storage("s3://ingest-root/tans")
    ingest_imagefolder(remote, f"s3://{bucket}/folder", "from_s3", image_size=16)
    local = Storage(str(tmp_path / "root"))
    ingest_imagefolder(local, str(src), "from_s3", image_size=16)
    assert read_task_info(remote, "from_s3").classes == ["a", "b"]
    for split in ("train", "test"):
        assert read_split(remote, "from_s3", split).equals(read_split(local, "from_s3", split))
    with pytest.raises(IngestError, match="no such directory"):
        ingest_imagefolder(remote, f"s3://{bucket}/missing", "x")
    assert not remote.exists("tasks/x")
