"""Validation metrics and baselines on small hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tans.space.metrics import (
    predictor_metrics,
    random_baseline,
    ranks_of_best,
    retrieval_metrics,
    size_baseline,
    space_metrics,
)

# index: rows 0-2 task a (best = row 1), rows 3-5 task b (best = row 5)
TASKS = ["a", "a", "a", "b", "b", "b"]
ACC = [0.5, 0.9, 0.7, 0.3, 0.4, 0.8]
N_PARAMS = [1, 3, 2, 30, 20, 10]


@pytest.mark.timeout(20)
def test_ranks_and_recall_hand_made():
    scores = np.array([
        [0.1, 0.9, 0.2, 0.3, 0.0, 0.5],  # a's best (row 1) ranked 1st
        [0.7, 0.6, 0.0, 0.1, 0.2, 0.5],  # b's best (row 5) ranked 3rd
    ])
    assert ranks_of_best(scores, TASKS, ACC, ["a", "b"]).tolist() == [1, 3]
    m = retrieval_metrics(scores, TASKS, ACC, ["a", "b"], ks=(1, 3, 5))
    assert m == {"R@1": 0.5, "R@3": 1.0, "R@5": 1.0, "mean_rank": 2.0, "median_rank": 2.0}
    m = retrieval_metrics(scores[1:], TASKS, ACC, ["b"])
    assert (m["R@1"], m["R@5"], m["mean_rank"], m["median_rank"]) == (0.0, 1.0, 3.0, 3.0)
    # three queries: ranks 1, 3, 6 -> mean 10/3, median 3
    worst = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    ranks = ranks_of_best(np.vstack([scores, worst]), TASKS, ACC, ["a", "b", "b"]).tolist()
    assert ranks == [1, 3, 6]
    m = retrieval_metrics(np.vstack([scores, worst]), TASKS, ACC, ["a", "b", "b"])
    assert m["mean_rank"] == pytest.approx(10 / 3) and m["median_rank"] == 3.0
    with pytest.raises(ValueError, match="no model in the index"):
        ranks_of_best(scores, TASKS, ACC, ["a", "zz"])


@pytest.mark.timeout(20)
def test_predictor_metrics_and_size_baseline():
    pred = [0.4, 0.8, 0.6, 0.3, 0.3, 0.3]  # task a: perfect order; task b: constant (tau undefined)
    m = predictor_metrics(pred, ACC, TASKS, ["a", "b"])
    assert m["kendall_tau"] == pytest.approx(1.0)  # b is skipped
    expected = math.sqrt((0.01 + 0.01 + 0.01 + 0 + 0.01 + 0.25) / 6)
    assert m["rmse"] == pytest.approx(expected)
    assert predictor_metrics(pred, ACC, TASKS, ["a"])["rmse"] == pytest.approx(0.1)
    # size: task a n_params 1,3,2 vs acc .5,.9,.7 -> tau 1; task b 30,20,10 vs .3,.4,.8 -> tau -1
    assert size_baseline(N_PARAMS, ACC, TASKS, ["a", "b"])["kendall_tau"] == pytest.approx(0.0)
    assert size_baseline(N_PARAMS, ACC, TASKS, ["b"])["kendall_tau"] == pytest.approx(-1.0)
    assert math.isnan(size_baseline([5] * 6, ACC, TASKS, ["a"])["kendall_tau"])


@pytest.mark.timeout(20)
def test_random_baseline_is_exact():
    b = random_baseline(20, ks=(1, 5, 10, 50))
    assert b == {"R@1": 0.05, "R@5": 0.25, "R@10": 0.5, "R@50": 1.0, "mean_rank": 10.5, "median_rank": 10.5,
                 "kendall_tau": 0.0}
    # agrees with a seeded Monte Carlo of random rankings
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 21, 100_000)
    assert np.mean(ranks <= 5) == pytest.approx(b["R@5"], abs=0.01)
    assert np.mean(ranks) == pytest.approx(b["mean_rank"], abs=0.1)


@pytest.mark.timeout(20)
def test_space_metrics_is_json_ready():
    import json

    scores = np.array([[0.1, 0.9, 0.2, 0.3, 0.0, 0.5]])
    m = space_metrics(scores, [0.4, 0.8, 0.6, 0.3, 0.3, 0.3], TASKS, ACC, N_PARAMS, ["a"])
    assert m["R@1"] == 1.0 and m["baselines"]["random"]["R@1"] == pytest.approx(1 / 6)
    assert m["baselines"]["size"]["kendall_tau"] == pytest.approx(1.0)
    assert json.loads(json.dumps(m)) == m


@pytest.mark.timeout(20)
def test_tied_best_models_are_all_targets():
    acc = [0.5, 0.9, 0.9, 0.3, 0.4, 0.8]  # task a: rows 1 and 2 tie for best
    scores = np.array([[0.1, 0.2, 0.8, 0.9, 0.0, 0.5]])  # row 2 (tied best) ranked 2nd, row 1 4th
    assert ranks_of_best(scores, TASKS, acc, ["a"]).tolist() == [2]
    assert ranks_of_best(scores, TASKS, ACC, ["a"]).tolist() == [4]  # without the tie: row 1 only
    b = space_metrics(scores, [0.5] * 6, TASKS, acc, N_PARAMS, ["a"])["baselines"]["random"]
    assert b == random_baseline(6, n_best=[2])


@pytest.mark.timeout(20)
def test_random_baseline_with_tied_targets_matches_monte_carlo():
    b = random_baseline(20, ks=(1, 5), n_best=[1, 3])
    rng = np.random.default_rng(0)
    ranks = []
    for m in [1, 3] * 20_000:  # the first of m targets in a random permutation of 20 rows
        ranks.append(1 + int(np.min(rng.permutation(20)[:m])))
    ranks = np.array(ranks)
    assert b["R@1"] == pytest.approx((1 / 20 + 3 / 20) / 2)
    assert np.mean(ranks <= 5) == pytest.approx(b["R@5"], abs=0.01)
    assert b["mean_rank"] == pytest.approx((21 / 2 + 21 / 4) / 2)
    assert np.mean(ranks) == pytest.approx(b["mean_rank"], abs=0.1)
    assert b["median_rank"] == np.median(ranks)
    with pytest.raises(ValueError, match="n_best"):
        random_baseline(5, n_best=[6])
