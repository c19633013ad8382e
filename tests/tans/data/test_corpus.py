"""The built-in corpus as a user sees it: `tans data list`, materialised tasks, and the splits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tans.data.builtin import catalog
from tans.data.reader import load_task_tensors
from tans.data.tasks import decode_png, read_split, read_task_info
from tans.job_configs import CONFIG_DIR, load_splits
from tans.storage import Storage
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def listed():
    proc = run_cli("data", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(120)
def test_data_list_json_meets_the_corpus_rules(listed):
    assert len(listed) >= 40
    for row in listed:
        assert {"task", "source", "classes", "train", "test"} <= set(row)
        start, end = (int(x) for x in row["task"].rsplit("_", 2)[1:])
        assert row["task"] == f"{row['source']}_{start}_{end}" and row["classes"] == end - start
        assert 5 <= row["classes"] <= 20
        assert row["train"] > 0 and row["test"] > 0
    per_source = Counter(r["source"] for r in listed)
    assert len(per_source) >= 6
    assert min(per_source.values()) >= 2
    assert max(per_source.values()) <= len(listed) / 2
    assert len({r["task"] for r in listed}) == len(listed)


@pytest.mark.timeout(60)
def test_data_list_human_readable():
    proc = run_cli("data", "list")
    assert proc.returncode == 0
    assert "built-in tasks from" in proc.stdout and "fashion_0_5" in proc.stdout


def _smallest_task_per_source(rows):
    best = {}
    for r in rows:
        if r["source"] not in best or r["train"] + r["test"] < best[r["source"]]["train"] + best[r["source"]]["test"]:
            best[r["source"]] = r
    return sorted(best.values(), key=lambda r: r["task"])


@pytest.mark.timeout(900)
def test_one_task_of_every_source_end_to_end(listed, tmp_path):
    """Materialise a task of every source; images decode, labels cover classes, counts match the list."""
    st = Storage(str(tmp_path / "root"))
    rows = _smallest_task_per_source(listed)
    assert len(rows) == len({r["source"] for r in listed})
    for row in rows:
        (spec,) = catalog.resolve(f"builtin:{row['task']}")
        report = catalog.materialise(st, spec)
        info = read_task_info(st, row["task"])
        assert info.counts == {"train": row["train"], "test": row["test"]}, row["task"]
        assert len(info.classes) == row["classes"]
        assert info.licence and info.source.startswith(f"builtin:{row['source']}")
        for split in ("train", "test"):
            table = read_split(st, row["task"], split)
            labels = np.array(table.column("label").to_pylist())
            assert table.num_rows == row[split]
            assert set(labels.tolist()) == set(range(row["classes"])), (row["task"], split)
            assert sum(info.class_counts[split]) == row[split]
            for png in table.column("image").to_pylist()[:: max(1, table.num_rows // 20)]:
                arr = decode_png(png)
                assert arr.shape[:2] == (info.image_size, info.image_size)
                assert arr.ndim == (2 if info.channels == 1 else 3)
                assert arr.std() > 0, f"{row['task']}: blank image"
        assert report.info.name == row["task"]
    # the library reader turns any of them into 3-channel training tensors
    data = load_task_tensors(st, rows[0]["task"], "train", image_size=32, channels=3)
    assert tuple(data.images.shape[1:]) == (3, 32, 32) and len(data) == rows[0]["train"]


@pytest.mark.timeout(300)
def test_cli_builtin_ingest_and_rerun(tmp_path):
    root = tmp_path / "root"
    proc = run_cli("data", "ingest", "builtin:digits", "--root", str(root), "--config", "configs/data/tiny.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "materialised 2 task(s)" in proc.stdout
    st = Storage(str(root))
    assert read_task_info(st, "digits_0_5").classes == ["0", "1", "2", "3", "4"]
    again = run_cli("data", "ingest", "builtin:digits", "--root", str(root), "--config", "configs/data/tiny.yaml")
    assert again.returncode == 0 and "2 task(s) already" in again.stdout and "materialised 0 task(s)" in again.stdout
    single = run_cli("data", "ingest", "builtin:digits_0_5", "--root", str(root))
    assert single.returncode == 1 and "already exists" in single.stderr
    unknown = run_cli("data", "ingest", "builtin:nosuch", "--root", str(root))
    assert unknown.returncode == 1 and "unknown built-in dataset" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_splits_are_disjoint_listed_and_hold_out_a_source(listed):
    by_task = {r["task"]: r for r in listed}
    splits = load_splits(CONFIG_DIR / "splits" / "default.yaml")
    train, val, test = set(splits.meta_train), set(splits.meta_val), set(splits.meta_test)
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert (train | val | test) <= set(by_task), sorted((train | val | test) - set(by_task))
    test_sources = {by_task[t]["source"] for t in test}
    other_sources = {by_task[t]["source"] for t in train | val}
    held_out = test_sources - other_sources
    assert held_out, "meta_test must hold at least one whole source that no other split touches"
    for source in held_out:
        tasks = [t for t in test if by_task[t]["source"] == source]
        assert len(tasks) >= 3 and all(by_task[t]["test"] >= 500 for t in tasks)
        assert sorted(tasks) == sorted(r["task"] for r in listed if r["source"] == source)  # the whole source
    # upscaled 8x8 digits saturate for every start: not a meta-test target
    assert not any(by_task[t]["source"] == "digits" for t in test)
    tiny = load_splits(CONFIG_DIR / "splits" / "tiny.yaml")
    assert set(tiny.all_tasks()) <= set(by_task)
