"""`tans train-space` end to end on the tiny zoo: queries, Ray Train, index, metrics, Retriever.load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tans.space.features import read_query
from tans.space.retrieval import Retriever, UnsatisfiableConstraint
from tans.space.store import SpaceNotFound
from tans.storage import Storage
from tans.zoo.store import ZOO_SCHEMA, read_zoo
from tests.conftest import TINY_SPACE, TINY_ZOO, run_cli

TRAIN, VAL = ["digits_0_5", "digits_5_10", "mnist_0_5"], ["mnist_5_10"]


@pytest.mark.timeout(1500)
def test_space_run_writes_everything_a_consumer_needs(tiny_space):
    root, proc = tiny_space
    run = root / "spaces" / TINY_SPACE
    assert "meta-val" in proc.stdout and "random" in proc.stdout  # the closing table
    assert (root / "spaces" / "LATEST").read_text().strip() == TINY_SPACE
    info = json.loads((run / "space.json").read_text())
    assert info["zoo"] == TINY_ZOO and info["family"] == "ofa_mbv3_tiny" and info["image_size"] == 32
    assert info["feature_dim"] == 448 and info["extractor"]["kind"] == "supernet"
    assert info["train_tasks"] == TRAIN and info["val_tasks"] == VAL

    # one query per task: per_class (8) images of every class, features of the extractor's size
    st = Storage(str(root))
    for task in TRAIN + VAL:
        x, y = read_query(st, info["extractor"]["name"], task)
        assert x.shape == (8 * 5, 448) and np.bincount(y).tolist() == [8] * 5
        assert np.isfinite(x).all() and x.std() > 0

    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["val"]
    for key in ("R@1", "R@5", "R@10", "mean_rank", "median_rank", "rmse", "kendall_tau"):
        assert key in val and val[key] == val[key], key  # present and not NaN
    assert set(val["baselines"]) == {"random", "size"}
    assert val["baselines"]["random"]["mean_rank"] == pytest.approx((16 + 1) / 2)
    assert len(metrics["history"]) == 3  # 60 steps, evaluated every 20
    assert metrics["best_step"] in (20, 40, 60)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tb").glob("events.out.tfevents.*"))

    # the index: every zoo row, zoo columns without f_emb, plus a unit-norm embedding
    index = st.read_parquet(f"spaces/{TINY_SPACE}/index.parquet")
    zoo = read_zoo(st, TINY_ZOO)
    assert index.num_rows == zoo.num_rows
    assert index.column_names == [c for c in ZOO_SCHEMA.names if c != "f_emb"] + ["embedding"]
    emb = np.asarray(index.column("embedding").to_pylist())
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.timeout(1500)
def test_retriever_load_answers_with_constraints(tiny_space):
    root, _ = tiny_space
    by_root = Retriever.load(str(root))
    by_run = Retriever.load(str(root / "spaces" / TINY_SPACE))
    assert len(by_root) == len(by_run) == 16 and by_root.info["run"] == TINY_SPACE
    x, y = read_query(Storage(str(root)), by_root.info["extractor"]["name"], "mnist_5_10")
    a = by_root.retrieve(x, y, k=5)
    b = by_run.retrieve(x, y, k=5)
    assert [c.model_id for c in a.candidates] == [c.model_id for c in b.candidates]
    assert len(a.candidates) == 5
    preds = [c.predicted_accuracy for c in a.candidates]
    assert preds == sorted(preds, reverse=True)  # re-ranked by the predictor

    limit = int(np.median(by_root.n_params))
    small = by_root.retrieve(x, y, k=50, max_params=limit)
    assert small.candidates and all(c.n_params <= limit for c in small.candidates)
    assert small.returned_k == int((by_root.n_params <= limit).sum()) < 50 and "only" in small.note
    with pytest.raises(UnsatisfiableConstraint, match="smallest model"):
        by_root.retrieve(x, y, k=3, max_params=10)

    # images go through the space's own extractor: a task's stored images give a real answer
    from tans.data.reader import load_task_tensors

    data = load_task_tensors(Storage(str(root)), "mnist_5_10", "train", 32)
    res = by_root.retrieve_images(data.images[::5], data.labels[::5], k=3)
    assert len(res.candidates) == 3
    with pytest.raises(ValueError, match="2 classes"):
        by_root.retrieve_images(data.images[:4], torch.zeros(4, dtype=torch.long), k=3)
    with pytest.raises(SpaceNotFound):
        Retriever.load(str(root / "spaces" / "no-such-run"))


@pytest.mark.timeout(1500)
def test_rerun_reuses_and_bad_input_is_one_line(tiny_space, tmp_path):
    root, _ = tiny_space
    again = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), timeout=300)
    assert again.returncode == 0 and "reusing the finished space" in again.stdout, again.stderr[-2000:]
    assert "note:" not in again.stdout
    # a finished space reused under another architecture setting says so (and how to retrain)
    other = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), "task_features=false",
                    timeout=300)
    assert other.returncode == 0 and "note: it was trained with task_features=True" in other.stdout, other.stdout

    cases = [
        (["zoo=no-such-zoo", "name=bad1"], 1, "no-such-zoo"),
        (["stepz=3"], 2, "stepz"),
        (["tasks_per_step=1"], 2, "tasks_per_step"),
        (["extractor.kind=resnet18", "extractor.uri=/nonexistent/r18.pt", "name=bad2"], 1, "/nonexistent/r18.pt"),
    ]
    for overrides, code, needle in cases:
        proc = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), *overrides,
                       timeout=300)
        errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == code and len(errors) == 1 and needle in errors[0], (overrides, proc.stderr[-2000:])
    assert not (root / "spaces" / "bad1" / "space.json").exists()
    assert not (root / "spaces" / "bad2" / "space.json").exists()
    assert (root / "spaces" / "LATEST").read_text().strip() == TINY_SPACE


@pytest.mark.timeout(1500)
def test_force_builds_beside_the_finished_space_and_survives_a_kill(tiny_space, tmp_path, ledger):
    """`--force` on a finished space: SIGKILLed mid-training, the old space still answers (and
    LATEST still names it); run again, the new generation swaps in and the old files go."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    src, _ = tiny_space
    root = tmp_path / "copy"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("searches", "evaluations", "exports"))
    run = root / "spaces" / TINY_SPACE
    before = {name: (run / name).read_bytes() for name in ("space.json", "model.pt", "index.parquet")}
    x, y = torch.randn(20, 448, generator=torch.Generator().manual_seed(0)), torch.arange(5).repeat(4)

    def answer():
        return [c.model_id for c in Retriever.load(str(root)).retrieve(x, y, k=8).candidates]

    old_answer = answer()

    # one writer per run: while another live process holds the run, the job exits in one line
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom tans.lease import Lease\n"
            "from tans.storage import Storage\n"
            f"lease = Lease(Storage({str(root)!r}), 'spaces/{TINY_SPACE}', what='holder').acquire()\n"
            "print('HOLDING', flush=True)\ntime.sleep(300)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        refused = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), "--force",
                          timeout=300)
        errors = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-2000:]
        assert f"being written by pid {holder.pid}" in errors[0] and "(holder)" in errors[0]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert not list(run.glob("g-*")) and (run / "space.json").read_bytes() == before["space.json"]

    cmd = [sys.executable, "-m", "jobs.cli", "train-space", "--config", "configs/space/tiny.yaml", "--root", str(root),
           "--force"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=os.environ.copy())
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and not list(run.glob("g-*/tb/*")):
            assert proc.poll() is None, "the forced run ended before it was killed"
            time.sleep(0.2)
        assert list(run.glob("g-*/tb/*")), "the forced run never started training"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    ledger.fault(2)  # a second writer while the run is held, then SIGKILL mid-training
    ledger.intact(before, {name: (run / name).read_bytes() for name in before})
    assert (root / "spaces" / "LATEST").read_text().strip() == TINY_SPACE and answer() == old_answer
    assert (run / "lease.json").exists()  # the killed writer's lease: the next run takes it over

    again = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), "--force", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[lease] took over" in again.stdout and "is gone" in again.stdout
    info = json.loads((run / "space.json").read_text())
    gen = info["files"]
    assert gen.startswith("g-") and {p.name for p in run.iterdir()} == {"space.json", "run.json", gen}
    assert (run / gen / "model.pt").is_file() and (run / gen / "metrics.json").is_file()
    assert len(answer()) == 8 and (root / "spaces" / "LATEST").read_text().strip() == TINY_SPACE


@pytest.mark.timeout(1800)
def test_transfer_runs_teach_the_predictor_from_evaluations_of_meta_train_targets(tiny_space, tmp_path):
    """An evaluation of a meta_train target feeds `transfer_runs`; one of a meta_test target is refused."""
    import shutil

    src, _ = tiny_space
    root = tmp_path / "copy"  # this test trains spaces: LATEST of the shared root stays the tiny space
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("searches", "evaluations", "exports"))
    ev = run_cli("evaluate", "--config", "configs/evaluate/tiny.yaml", "--root", str(root), "--dataset", TRAIN[0],
                 "--seeds", "0", "--name", "xfer", "references=[]", timeout=1200)
    assert ev.returncode == 0, ev.stderr[-3000:]
    record = json.loads((root / "evaluations" / "xfer" / "targets" / f"{TRAIN[0]}-s0.json").read_text())
    # the target's own source (digits) leaves the pool: its fine-tunes are of mnist models
    usable = [m for m, v in record["ground_truth"].items() if "-mnist_0_5-" in m and v["test_accuracy"] is not None]
    assert usable and not [m for m in record["ground_truth"] if "-digits_" in m]

    proc = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), "name=tiny-xfer",
                   "transfer_runs=[xfer]", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only meta_train zoo models train (mnist_5_10 is the meta_val task: its models stay out)
    assert f"[space] transfer: {len(usable)} pairs" in proc.stdout and "of 1 meta_train targets in xfer" in proc.stdout
    info = json.loads((root / "spaces" / "tiny-xfer" / "space.json").read_text())
    assert info["transfer"] == {"runs": ["xfer"], "tasks": [TRAIN[0]], "weight": 1.0}
    from tans.space.store import files_dir

    metrics = json.loads((root / files_dir("tiny-xfer", info["files"]) / "metrics.json").read_text())
    assert all(np.isfinite(h["transfer"]) and h["transfer"] >= 0 for h in metrics["history"])
    assert read_query(Storage(str(root)), info["extractor"]["name"], TRAIN[0])[0].shape[0] > 0
    # that space may not be judged on the target it learned from
    judged = run_cli("evaluate", "--config", "configs/evaluate/tiny.yaml", "--root", str(root), "--dataset", TRAIN[0],
                     "--name", "leak", "space=tiny-xfer", timeout=300)
    errors = [line for line in judged.stderr.strip().splitlines() if line.startswith("error:")]
    assert judged.returncode == 1 and len(errors) == 1 and f"learned from fine-tunes on '{TRAIN[0]}'" in errors[0]
    assert not (root / "evaluations" / "leak").exists()

    # a record of a meta_test target may not teach the space: one line, nothing written
    bad_run = root / "evaluations" / "xfer-test" / "targets"
    bad_run.mkdir(parents=True)
    (bad_run / "clipart_0_9-s0.json").write_text(json.dumps({**record, "task": "clipart_0_9"}))
    for runs, needle in (("[xfer-test]", "'clipart_0_9', which is not a meta_train task"),
                         ("[no-such-run]", "'no-such-run' has no finished records")):
        bad = run_cli("train-space", "--config", "configs/space/tiny.yaml", "--root", str(root), "name=tiny-bad",
                      f"transfer_runs={runs}", timeout=300)
        errors = [line for line in bad.stderr.strip().splitlines() if line.startswith("error:")]
        assert bad.returncode == 1 and len(errors) == 1 and needle in errors[0], bad.stderr[-2000:]
    assert not (root / "spaces" / "tiny-bad" / "space.json").exists()
