"""bench/score_blend.py: the blended ranking, its tau, pick and search regret, on a hand-made record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import weightedtau

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "score_blend.py"


def _module():
    spec = importlib.util.spec_from_file_location("score_blend", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record() -> dict:
    # model: (val, test). The space ranks a > b > c > d; the nearest dataset d > c > b > a.
    acc = {"a": (0.5, 0.50), "b": (0.7, 0.60), "c": (0.6, 0.65), "d": (0.9, 0.80)}
    pool = list(acc)
    return {
        "task": "t",
        "pool": pool,
        "ground_truth": {m: {"val_accuracy": v, "test_accuracy": t} for m, (v, t) in acc.items()},
        "methods": {
            "tans_similarity": {"scores": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}},
            "tans_predicted": {"scores": {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}},
            "nearest_dataset": {"scores": {"a": -3.0, "b": -2.0, "c": -1.0, "d": 0.0}, "pick": "d"},
            "logme": {"scores": {"a": 1.0, "b": 2.0, "c": 4.0, "d": 3.0}, "pick": "c"},
        },
    }


def test_blend_of_opposite_rankings_follows_the_heavier_side():
    mod = _module()
    rec = _record()
    # both scores are evenly spaced, so their z-scores are exact mirrors: z_space = -z_near
    alone = mod.judge(rec, "tans_similarity", 0.0)
    assert alone["top1"] == pytest.approx(30.0)  # a
    # the search fine-tunes a, b, c and the nearest's d; d is best on validation
    assert alone["search"] == pytest.approx(0.0)
    truth = [0.50, 0.60, 0.65, 0.80]
    assert alone["tau"] == pytest.approx(weightedtau(truth, [0.9, 0.8, 0.7, 0.6]).statistic)
    heavy = mod.judge(rec, "tans_similarity", 2.0)  # z_space + 2 z_near = z_near: d first
    assert heavy["top1"] == pytest.approx(0.0)
    assert heavy["tau"] == pytest.approx(weightedtau(truth, [0, 1, 2, 3]).statistic)
    assert heavy["tau"] > alone["tau"]


def test_cli_prints_a_row_per_score_and_alpha_and_rejects_bad_alphas(tmp_path):
    targets = tmp_path / "evaluations" / "r" / "targets"
    targets.mkdir(parents=True)
    (targets / "t-s0.json").write_text(json.dumps(_record()))
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r", "--alphas", "0,2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    rows = [line.split() for line in ok.stdout.splitlines() if line.startswith("tans_")]
    assert [(r[0], float(r[1])) for r in rows] == [("tans_similarity", 0.0), ("tans_similarity", 2.0),
                                                  ("tans_predicted", 0.0), ("tans_predicted", 2.0)]
    assert [float(r[3]) for r in rows] == [30.0, 0.0, 30.0, 0.0]
    both = [line.split() for line in ok.stdout.splitlines() if line.startswith("similarity+predicted")]
    assert [float(r[1]) for r in both] == [0.0, 2.0] and [float(r[3]) for r in both] == [30.0, 0.0]
    logme = [line.split() for line in ok.stdout.splitlines() if line.startswith("logme")][0]
    assert float(logme[2]) == pytest.approx(15.0)
    # the fine-tunes' own validation accuracies rank d > b > c > a: d is the pool's best (regret 0)
    val = [line.split() for line in ok.stdout.splitlines() if line.startswith("fine-tune val")][0]
    expected = weightedtau([0.5, 0.7, 0.6, 0.9], [0.50, 0.60, 0.65, 0.80]).statistic
    assert float(val[2]) == pytest.approx(expected, abs=1e-3) and float(val[3]) == 0.0
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r", "--alphas", "x"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--alphas" in bad.stderr


def test_the_sum_of_both_space_scores_is_their_standardised_z_sum():
    import numpy as np

    mod = _module()
    rec = _record()
    rec["methods"]["tans_predicted"]["scores"] = {"a": 0.1, "b": 0.9, "c": 0.3, "d": 0.2}
    pool = rec["pool"]

    def z(v):
        v = np.asarray(v, dtype=float)
        return (v - v.mean()) / v.std()

    sim = z([0.9, 0.8, 0.7, 0.6])
    pred = z([0.1, 0.9, 0.3, 0.2])
    expected = z(sim + pred)
    got = mod.space_score(rec, mod.BOTH, pool)
    assert [got[m] for m in pool] == pytest.approx(list(expected))
    # b leads the sum (second by similarity, first by prediction), so it is the blend's first pick at alpha 0
    assert mod.judge(rec, mod.BOTH, 0.0)["top1"] == pytest.approx(20.0)
