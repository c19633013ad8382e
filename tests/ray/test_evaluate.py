"""`tans evaluate` end to end on the tiny zoo and space: pools, ground truth, every selector, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy.stats import weightedtau

from tans.selection.evaluation import FEATURE_METHODS, METHODS
from tans.space.prior import DEFAULT_PRIOR_WEIGHT
from tests.conftest import REPO, make_imagefolder, run_cli

CFG = "configs/evaluate/tiny.yaml"
TASK = "clipart_0_9"  # meta_test of the tiny splits


def _evaluate(root, *args, timeout=1500):
    return run_cli("evaluate", "--config", CFG, "--root", str(root), *args, timeout=timeout)


@pytest.fixture(scope="module")
def resumed(tiny_space):
    """A 2-seed evaluation of the meta_test task, SIGKILLed after its first record, then resumed."""
    root, _ = tiny_space
    cmd = [sys.executable, "-m", "jobs.cli", "evaluate", "--config", CFG, "--root", str(root), "--name", "main"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=os.environ.copy())
    first = root / "evaluations" / "main" / "targets" / f"{TASK}-s0.json"
    deadline = time.monotonic() + 1200
    try:
        while time.monotonic() < deadline and not first.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        assert first.exists(), "the first record never appeared"
        saved = first.read_bytes()
        time.sleep(3)  # into the second seed's work
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray: an abrupt interruption
        proc.wait(timeout=60)
    assert not (root / "evaluations" / "main" / "evaluation.json").exists()
    again = _evaluate(root, "--name", "main")
    assert again.returncode == 0, again.stderr[-3000:]
    return root, saved, again


@pytest.mark.timeout(2400)
def test_resumed_run_keeps_finished_records_and_writes_every_output(resumed):
    root, saved, proc = resumed
    run = root / "evaluations" / "main"
    assert f"{TASK} seed 0: finished earlier" in proc.stdout
    assert (run / "targets" / f"{TASK}-s0.json").read_bytes() == saved  # the finished record was not redone
    ev = json.loads((run / "evaluation.json").read_text())
    assert [(t["task"], t["seed"]) for t in ev["targets"]] == [(TASK, 0), (TASK, 1)]
    md = (run / "evaluation.md").read_text()
    assert md.splitlines()[0].startswith("# Model-selection evaluation") and "| method |" in md
    assert (run / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    assert set(ev["summary"]) == set(METHODS)
    for t in ev["targets"]:
        assert set(t["methods"]) == set(METHODS)
        pool = t["pool"]
        assert 2 <= len(pool) <= 6 and len(set(pool)) == len(pool)
        assert set(t["ground_truth"]) == set(pool)  # every pool model fine-tuned
        for m, entry in t["methods"].items():
            assert entry["pick"] in pool, m  # every selector chooses within the pool
            assert entry["seconds"] >= 0
            if m != "tans_search":
                assert set(entry["scores"]) == set(pool), m
        assert t["methods"]["tans_search"]["scores"] is None
        assert set(t["methods"]["tans_search"]["finetuned"]) <= set(pool)
        assert {"scratch", "generic"} <= set(t["references"])
    # scratch_long: first seed only, with the configured factor of the recipe's epochs
    assert ev["targets"][0]["references"]["scratch_long"]["epochs"] == 2 * 2
    assert "scratch_long" not in ev["targets"][1]["references"]
    # the two seeds draw different splits: different ground truth
    assert ev["targets"][0]["ground_truth"] != ev["targets"][1]["ground_truth"]


@pytest.mark.timeout(600)
def test_metrics_recompute_from_the_raw_numbers(resumed, tmp_path):
    root, _, _ = resumed
    ev = json.loads((root / "evaluations" / "main" / "evaluation.json").read_text())
    per_method = {m: {"tau": [], "regret": []} for m in METHODS}
    for t in ev["targets"]:
        truth = {m: v["test_accuracy"] for m, v in t["ground_truth"].items()}
        best = max(truth.values())
        for m, entry in t["methods"].items():
            per_method[m]["regret"].append(best - truth[entry["pick"]])
            if entry["scores"] is not None:
                ids = sorted(truth)
                x, y = np.array([truth[i] for i in ids]), np.array([entry["scores"][i] for i in ids])
                if np.ptp(x) > 0 and np.ptp(y) > 0:
                    per_method[m]["tau"].append(weightedtau(x, y).statistic)
        # tans_search picks the best validation accuracy among the candidates it fine-tuned
        fine = t["methods"]["tans_search"]["finetuned"]
        vals = [t["ground_truth"][i]["val_accuracy"] for i in fine]
        assert t["methods"]["tans_search"]["pick"] == fine[int(np.argmax(vals))]
        # every fine-tune keeps its validation loss (per epoch too): the other rule can be judged
        for rec in t["ground_truth"].values():
            assert rec["val_loss"] > 0 and rec["epoch_val_loss"][-1] == rec["val_loss"]
            assert len(rec["epoch_val_accuracy"]) == len(rec["epoch_test_accuracy"]) == 2
    for m, got in per_method.items():
        s = ev["summary"][m]
        assert s["top1_regret"] == pytest.approx(float(np.mean(got["regret"])), abs=1e-9), m
        assert s["top1_regret"] >= 0
        if got["tau"]:
            assert s["weighted_tau"] == pytest.approx(float(np.mean(got["tau"])), abs=1e-9), m
            lo, hi = s["weighted_tau_ci95"]
            assert lo - 1e-9 <= s["weighted_tau"] <= hi + 1e-9
    # a rerun reuses every record; another run over the same targets reuses the cached ground truth
    again = _evaluate(root, "--name", "main")
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 2
    # ... even when it fine-tunes fewer of TANS's retrieved models and ranks them with the
    # nearest-dataset prior: that only changes which models it reads
    recipe = tmp_path / "search-finetune-1.yaml"
    recipe.write_text((REPO / "configs/search/tiny.yaml").read_text().replace("finetune: 2", "finetune: 1")
                      + "\nprior_weight: 2.0\n")
    other = _evaluate(root, "--name", "main-again", f"search={recipe}")
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.count("measured earlier") == 2
    ev2 = json.loads((root / "evaluations" / "main-again" / "evaluation.json").read_text())
    assert [t["ground_truth"] for t in ev2["targets"]] == [t["ground_truth"] for t in ev["targets"]]

    def z(scores, pool):
        v = np.array([scores[m] for m in pool])
        return (v - v.mean()) / (v.std() or 1.0)

    for t1, t2 in zip(ev["targets"], ev2["targets"]):
        pool = t2["pool"]
        fine1, fine2 = t1["methods"]["tans_search"]["finetuned"], t2["methods"]["tans_search"]["finetuned"]
        assert len(fine1) == 2 and len(fine2) == 1 and t2["methods"]["tans_search"]["pick"] == fine2[0]
        # the retrieval order is the standardised sum of the predictor's and the nearest dataset's
        # scores, with the recipe's prior_weight (the default, then 2); its first model is fine-tuned
        for t, weight in ((t1, DEFAULT_PRIOR_WEIGHT), (t2, 2.0)):
            ret = t["methods"]["tans_retrieval"]["scores"]
            blend = z(t["methods"]["tans_predicted"]["scores"], pool) + weight * z(t["methods"]["nearest_dataset"]
                                                                                  ["scores"], pool)
            assert [ret[m] for m in pool] == pytest.approx(list(blend), abs=1e-5)
        assert fine2 == [max(pool, key=lambda m: t2["methods"]["tans_retrieval"]["scores"][m])]
    # judged by the validation loss instead, over the same cached ground truth
    by_loss = _evaluate(root, "--name", "main-loss", "select_by=val_loss")
    assert by_loss.returncode == 0 and by_loss.stdout.count("measured earlier") == 2, by_loss.stderr[-3000:]
    ev3 = json.loads((root / "evaluations" / "main-loss" / "evaluation.json").read_text())
    assert ev3["settings"]["recipe"]["select_by"] == "val_loss"
    for t in ev3["targets"]:
        fine = t["methods"]["tans_search"]["finetuned"]
        losses = [t["ground_truth"][i]["val_loss"] for i in fine]
        assert t["methods"]["tans_search"]["pick"] == fine[int(np.argmin(losses))]
    # the same name with other settings is refused in one line
    clash = _evaluate(root, "--name", "main", "pool_cap=4")
    assert clash.returncode == 1 and "other settings" in clash.stderr


@pytest.mark.timeout(2400)
def test_imagefolder_and_zoo_task_targets(tiny_space, tmp_path):
    root, _ = tiny_space
    folder = make_imagefolder(tmp_path / "shapes", {"red": 30, "green": 30, "blue": 30}, size=24)
    (folder / "red" / "broken.png").write_bytes(b"not an image")  # skipped, and named
    proc = _evaluate(root, "--name", "other", "--dataset", str(folder), "--dataset", "mnist_5_10", "seeds=[3]",
                     "references=[scratch]", f"methods=[tans_similarity,tans_search,{FEATURE_METHODS[0]},size]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((root / "evaluations" / "other" / "evaluation.json").read_text())
    by_task = {t["task"]: t for t in ev["targets"]}
    assert set(by_task) == {"shapes", "mnist_5_10"} and all(t["seed"] == 3 for t in ev["targets"])
    assert by_task["shapes"]["excluded_zoo_tasks"] == []
    assert by_task["shapes"]["how"].startswith("ingested from an ImageFolder, skipping 1 unreadable file(s)")
    assert "red/broken.png" in by_task["shapes"]["how"] and "red/broken.png" in proc.stdout
    # a zoo task as the target: its source's rows (mnist_0_5 and itself) leave the pool
    zoo_target = by_task["mnist_5_10"]
    assert zoo_target["excluded_zoo_tasks"] == ["mnist_0_5", "mnist_5_10"]
    assert all("mnist" not in m for m in zoo_target["pool"])
    assert all("mnist" not in m for m in zoo_target["methods"]["tans_search"]["finetuned"])
    assert set(ev["summary"]) == {"tans_similarity", "tans_search", FEATURE_METHODS[0], "size"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["methods=[magic]"], "magic", 2),
        (["--dataset", "no_such_task"], "no_such_task", 1),
        (["--dataset", TASK, "--max-params", "10"], "relax the constraint", 1),
        (["seeds=[]"], "seeds", 2),
    ],
)
def test_bad_input_is_one_line_and_writes_no_evaluation(tiny_space, args, needle, code):
    root, _ = tiny_space
    proc = _evaluate(root, "--name", "bad", *args, timeout=300)
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (root / "evaluations" / "bad").exists()


@pytest.mark.timeout(1500)
def test_finished_records_leave_no_checkpoints_and_failed_fine_tunes_are_measured_again(resumed):
    root, _, _ = resumed
    cache = next((root / "evaluations" / "_cache").iterdir())  # <zoo>/
    entries = sorted(cache.glob(f"{TASK}-s0-*.json"))
    assert entries, "the resumed run cached no record"
    # the ground truth is in the cache file: the Tune runs' checkpoints of finished records are gone
    assert not [p.name for p in (cache / "tune").glob(f"{TASK}-s*")]
    # a fine-tune that failed (a full disk, a lost node) is not reused as a measurement
    entry = entries[0]
    good = json.loads(entry.read_text())
    victim = min(good["ground_truth"])
    broken = {**good, "ground_truth": {k: v for k, v in good["ground_truth"].items() if k != victim},
              "failed": [{"model_id": victim, "error": "OSError: [Errno 28] No space left on device"}]}
    entry.write_text(json.dumps(broken))
    proc = _evaluate(root, "--name", "again", "seeds=[0]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 fine-tune(s) failed last time; measuring again" in proc.stdout
    remeasured = json.loads(entry.read_text())
    assert remeasured["failed"] == [] and set(remeasured["ground_truth"]) == set(good["ground_truth"])
    ev = json.loads((root / "evaluations" / "again" / "evaluation.json").read_text())
    assert victim in ev["targets"][0]["ground_truth"]
