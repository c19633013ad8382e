"""`tans predict`: batch inference with an exported model over Ray Data (actor pool) -> Parquet."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs._common import run_main
from tans.data.reader import load_task_tensors
from tans.data.tasks import TaskInfo, encode_png, write_task
from tans.selection.export import export_model, load_model
from tans.selection.finetune import build_candidate, evaluate_accuracy, finetune
from tans.storage import Storage
from tans.zoo.subnets import largest
from tans.zoo.supernets import get_family
from tests.conftest import run_cli
from tests.tans.selection import TINY, colour_task

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """A tiny model fine-tuned on the colour task (better than chance), exported; returns its dir."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arch = largest(get_family(TINY))
        model = build_candidate(TINY, arch, num_classes=3, weights_uri=None, seed=0)
        train, val = colour_task(96, seed=1), colour_task(30, seed=2)
        finetune(model, train, val, None, epochs=2, batch_size=16, lr=0.1, seed=0)
        assert evaluate_accuracy(model, colour_task(60, seed=3)) > 0.6
        root = tmp_path_factory.mktemp("exports")
        return export_model(str(root), "searches/run1/model", model, TINY, arch, CLASSES, image_size=32)
    finally:
        torch.set_num_threads(threads)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def _metadata(table) -> dict:
    return json.loads(table.schema.metadata[b"tans.predict"])


@pytest.mark.timeout(240)
def test_predict_labels_an_image_folder_like_load_model(exported, tmp_path):
    data = colour_task(30, seed=5)
    src = tmp_path / "images"
    files = []
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
        folder = src / CLASSES[label] / ("nested" if i % 5 == 0 else "")  # read recursively
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_hwc(image))
        if i % 3 == 0:
            img = img.resize((48, 40))  # other sizes are resized as the export says
        if i % 7 == 0:
            img = img.convert("L")  # grey is repeated to 3 channels
        img.save(folder / f"img_{i:02d}.png")
        files.append(str(folder / f"img_{i:02d}.png"))
    broken = src / "red" / "broken.png"
    broken.write_bytes(b"not a png at all")
    (src / ".cache").mkdir()
    (src / ".cache" / "junk.bin").write_bytes(b"hidden files are not data")
    out = tmp_path / "out" / "preds.parquet"

    proc = run_cli("predict", "--model", exported, "--dataset", str(src), "--out", str(out),
                   "--batch-size", "8", "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 actor(s)" in proc.stdout
    assert "skipped 1 unreadable file(s)" in proc.stdout and str(broken) in proc.stdout
    assert f"written to {out}" in proc.stdout
    assert os.listdir(out.parent) == ["preds.parquet"]  # no temp file left behind

    table = pq.read_table(out)
    assert table.column_names == ["path", "label", "class", "confidence"]
    files.sort()
    assert table.column("path").to_pylist() == files  # one row per readable image, sorted
    loaded = load_model(exported)
    images = [Image.open(f) for f in files]
    expected = loaded.predict(images).tolist()
    labels = table.column("label").to_pylist()
    assert labels == expected
    assert table.column("class").to_pylist() == [CLASSES[i] for i in expected]
    probs = torch.softmax(loaded.logits(images).double(), dim=1).max(dim=1).values.numpy()
    np.testing.assert_allclose(table.column("confidence").to_numpy(), probs, rtol=1e-5)
    truth = [CLASSES.index(os.path.relpath(f, src).split(os.sep)[0]) for f in files]
    assert np.mean(np.array(labels) == np.array(truth)) > 0.6  # the model is better than chance
    meta = _metadata(table)
    assert (meta["images"], meta["skipped"], meta["skipped_examples"]) == (30, 1, [str(broken)])


@pytest.mark.timeout(240)
def test_predict_a_task_reports_its_accuracy(exported, ray_local, tmp_path, capsys):
    from jobs.predict import main, resolve_dataset, task_chunks

    root = tmp_path / "root"
    storage = Storage(str(root))
    test, train = colour_task(40, seed=7), colour_task(6, seed=8)
    info = TaskInfo(name="colours", classes=CLASSES, source="tests", licence="none", image_size=32, channels=3,
                    counts={})
    images = {s: [encode_png(_hwc(im)) for im in d.images] for s, d in (("test", test), ("train", train))}
    labels = {"test": test.labels.tolist(), "train": train.labels.tolist()}
    write_task(storage, info, images, labels, part_rows=16)  # 3 test parts: rows are numbered across parts

    assert run_main(main, ["--model", exported, "--dataset", "task:colours", "--root", str(root),
                           "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    out = root / "predictions" / "run1-model-colours-test.parquet"
    table = pq.read_table(out)
    assert table.column_names == ["path", "label", "class", "confidence", "true_label"]
    assert table.column("path").to_pylist() == [f"colours/test/{i}" for i in range(40)]
    assert table.column("true_label").to_pylist() == test.labels.tolist()

    loaded = load_model(exported)
    tensors = load_task_tensors(storage, "colours", "test", loaded.image_size, loaded.channels)
    accuracy = evaluate_accuracy(loaded.model, tensors)
    assert table.column("label").to_pylist() == loaded.predict(tensors.images).tolist()
    assert np.mean(table.column("label").to_numpy() == table.column("true_label").to_numpy()) == accuracy
    assert _metadata(table)["accuracy"] == accuracy
    assert f"accuracy {accuracy:.4f} on 40 images" in printed and f"written to {out}" in printed

    # a bare task name picks the task too, and --split the other split (resolved without running again)
    source = resolve_dataset("colours", storage, "train")
    assert (source.kind, source.task, source.split, source.rows) == ("task", "colours", "train", 6)
    chunks = task_chunks(resolve_dataset("task:colours", storage, None), chunk_rows=10)
    assert [(c["start"], c["stop"], c["first_row"]) for c in chunks] == [(0, 10, 0), (10, 16, 10), (0, 10, 16),
                                                                       (10, 16, 26), (0, 8, 32)]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


@pytest.mark.timeout(180)
def test_predict_errors_are_one_line_and_write_nothing(exported, tmp_path, capsys):
    from jobs.predict import main

    root = tmp_path / "root"
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(images / "x.png")

    proc = run_cli("predict", "--model", str(tmp_path / "no-such-model"), "--dataset", str(images.parent),
                   "--root", str(root))
    assert proc.returncode == 1
    assert "no such directory" in _one_error_line(proc.stderr)

    proc = run_cli("predict", "--model", exported, "--dataset", str(tmp_path / "no-such-dir"), "--root", str(root))
    assert proc.returncode == 1
    assert "no such directory" in _one_error_line(proc.stderr)

    not_export = tmp_path / "not-an-export"
    not_export.mkdir()
    cases = [
        (["--model", str(not_export), "--dataset", str(images.parent)], "model.json is missing"),
        (["--model", exported, "--dataset", "task:nope"], "task 'nope' not found"),
        (["--model", exported, "--dataset", "nope"], "no task 'nope'"),
        (["--model", exported, "--dataset", str(images.parent), "--split", "train"], "--split applies to a task"),
    ]
    for args, message in cases:
        assert run_main(main, [*args, "--root", str(root)]) == 1, args
        assert message in _one_error_line(capsys.readouterr().err), args
    assert not (root / "predictions").exists()
