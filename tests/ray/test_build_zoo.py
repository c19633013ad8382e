"""The zoo build end to end on a tiny trained zoo: real Ray, real training, real measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tans.storage import Storage
from tans.zoo.store import ZOO_SCHEMA, read_manifest, read_zoo
from tests.conftest import run_cli

TINY = "configs/zoo/tiny.yaml"
ZOO = "tiny-ofa_mbv3_tiny-32px"


@pytest.fixture
def tiny_root(tiny_data_root):
    return tiny_data_root


@pytest.fixture
def built(tiny_zoo):  # the session's tiny zoo (tests/conftest.py), shared with the later stages
    return tiny_zoo


@pytest.mark.timeout(1200)
def test_tiny_zoo_has_signal(built):
    root, proc = built
    st = Storage(str(root))
    table = read_zoo(st, ZOO)
    manifest = read_manifest(st, ZOO)
    assert table.schema.names == ZOO_SCHEMA.names
    assert manifest.tasks == ["digits_0_5", "digits_5_10", "mnist_0_5", "mnist_5_10"]  # meta_train + meta_val
    assert table.num_rows == 4 * 4
    rows = table.to_pylist()
    ids = [r["model_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(len(r["ks"]) == 20 and len(r["e"]) == 20 and len(r["d"]) == 5 for r in rows)
    for task in manifest.tasks:
        mine = [r for r in rows if r["task"] == task]
        largest = max(mine, key=lambda r: (sum(r["d"]), sum(r["e"]), sum(r["ks"])))
        assert largest["n_params"] == max(r["n_params"] for r in mine)
        assert largest["accuracy"] > 0.2 + 0.15, f"{task}: largest subnet {largest['accuracy']:.3f} is near chance"
        assert len({r["accuracy"] for r in mine}) > 1, f"{task}: all subnets measure the same"
    # the same architecture measures differently on different tasks (and embeds differently)
    by_arch = {}
    for r in rows:
        by_arch.setdefault((tuple(r["ks"]), tuple(r["e"]), tuple(r["d"])), []).append(r)
    # each task has its own sample beyond the largest and smallest (measure.per_task_archs)
    assert len(by_arch) > 4, f"{len(by_arch)} distinct architectures over 4 tasks x 4 subnets"
    assert sum(len(v) == 4 for v in by_arch.values()) == 2  # only the largest and the smallest are shared
    same = next(v for v in by_arch.values() if len(v) == 4)
    assert len({round(r["accuracy"], 6) for r in same}) > 1
    assert not np.allclose(same[0]["f_emb"], same[1]["f_emb"])
    build = json.loads((root / "zoo" / ZOO / "build.json").read_text())
    assert {i["task"] for i in build["items"]} == set(manifest.tasks)
    assert "zoo tiny" in proc.stdout or ZOO in proc.stdout
    # training curves for TensorBoard: base pretraining and every task's fine-tune
    assert list((root / "supernets" / ZOO / "base" / "tb").rglob("events.out.tfevents.*"))
    for task in manifest.tasks:
        assert list((root / "supernets" / ZOO / "tasks" / task / "tb").glob("events.out.tfevents.*")), task


@pytest.mark.timeout(1200)
def test_rerun_is_a_noop_and_resume_gives_the_same_rows(built):
    root, _ = built
    st = Storage(str(root))
    before = read_zoo(st, ZOO).sort_by("model_id")
    again = run_cli("build-zoo", "--config", TINY, "--root", str(root), timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 task(s) already measured" in again.stdout
    # a "killed" build: one task's part and the manifest are gone; resuming restores exactly them
    (root / "zoo" / ZOO / "part-mnist_0_5.parquet").unlink()
    (root / "zoo" / ZOO / "zoo.json").unlink()
    resumed = run_cli("build-zoo", "--config", TINY, "--root", str(root), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = read_zoo(st, ZOO).sort_by("model_id")
    for col in ("model_id", "ks", "e", "d", "accuracy", "n_params", "flops", "f_emb"):
        assert after.column(col).to_pylist() == before.column(col).to_pylist(), col
    stats = run_cli("zoo", "stats", "--json", "--root", str(root))
    assert stats.returncode == 0, stats.stderr
    parsed = json.loads(stats.stdout)
    assert parsed["rows"] == 16 and parsed["tasks"] == 4
    text = run_cli("zoo", "stats", "--root", str(root))
    assert "digits_0_5" in text.stdout and "median" in text.stdout


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["family=ofa_resnet_9000"], "ofa_resnet_9000"),
        (["tasks=[no_such_task]"], "not found"),
        (["tasks=[clipart_0_9]"], "meta_test"),
        (["pretrain.init=/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_zoo(tiny_root, tmp_path, overrides, message):
    name = "bad-zoo"
    proc = run_cli("build-zoo", "--config", TINY, "--root", str(tiny_root), f"name={name}", *overrides, timeout=500)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tiny_root / "zoo" / name).exists()


@pytest.mark.timeout(1800)
def test_force_rebuilds_beside_the_finished_zoo_and_a_damaged_part_is_rebuilt(built, tmp_path, ledger):
    """`build-zoo --force`, SIGKILLed mid-build, leaves the old zoo whole; run to the end, the new
    generation swaps in and the old parts go. A truncated part is rebuilt by a plain re-run."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, tree_digest

    src, _ = built
    root = tmp_path / "copy"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("spaces", "searches", "evaluations", "queries"))
    st = Storage(str(root))
    zoo_dir = root / "zoo" / ZOO
    old_rows = read_zoo(st, ZOO).sort_by("model_id")

    # a damaged part: one line from readers, and the next plain build rebuilds that task only
    part = zoo_dir / "part-digits_5_10.parquet"
    part.write_bytes(part.read_bytes()[:-64])
    ledger.fault()
    rebuilt = run_cli("build-zoo", "--config", TINY, "--root", str(root), timeout=900)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "rebuilding task 'digits_5_10'" in rebuilt.stdout and "3 task(s) already measured" in rebuilt.stdout
    assert read_zoo(st, ZOO).num_rows == old_rows.num_rows
    old_rows = read_zoo(st, ZOO).sort_by("model_id")

    before = {**{f"zoo/{k}": v for k, v in tree_digest(zoo_dir).items()},
              **{f"supernets/{k}": v for k, v in tree_digest(root / "supernets" / ZOO).items()}}
    cmd = [sys.executable, "-m", "jobs.cli", "build-zoo", "--config", TINY, "--root", str(root), "--force"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=os.environ.copy())
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and not list(zoo_dir.glob("g-*/part-*.parquet")):
            assert proc.poll() is None, "the forced build ended before it was killed"
            time.sleep(0.3)
        assert list(zoo_dir.glob("g-*/part-*.parquet")), "the forced build wrote no part"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    ledger.fault()
    after = {**{f"zoo/{k}": v for k, v in tree_digest(zoo_dir).items()},
             **{f"supernets/{k}": v for k, v in tree_digest(root / "supernets" / ZOO).items()}}
    ledger.intact(before, after)
    assert read_zoo(st, ZOO).sort_by("model_id").equals(old_rows)

    again = run_cli("build-zoo", "--config", TINY, "--root", str(root), "--force", timeout=1200)
    assert again.returncode == 0, again.stderr[-2000:]
    gen = read_manifest(st, ZOO).parts
    assert gen.startswith("g-")
    assert sorted(p.name for p in zoo_dir.iterdir()) == [gen, "zoo.json"]
    assert (zoo_dir / gen / "build.json").is_file()
    assert sorted(p.name for p in (root / "supernets" / ZOO).iterdir()) == ["config.json", gen]  # base too
    rows = read_zoo(st, ZOO)
    assert rows.num_rows == old_rows.num_rows
    assert all(f"/supernets/{ZOO}/{gen}/tasks/" in uri for uri in rows.column("supernet_uri").to_pylist())
