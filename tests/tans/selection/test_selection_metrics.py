"""The model-selection metrics against cases worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tans.selection.metrics import (
    bootstrap_ci,
    per_record_metrics,
    ranked_ids,
    summarise_methods,
    top_k_regret,
    weighted_tau,
    wins_or_ties,
)

TRUTH = {"a": 0.70, "b": 0.85, "c": 0.60, "d": 0.80}


# --- weighted tau ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_weighted_tau_identical_and_reversed_orderings():
    same = {"a": 1.0, "b": 4.0, "c": 0.0, "d": 2.5}
    assert weighted_tau(same, TRUTH) == pytest.approx(1.0)
    reversed_ = {k: -v for k, v in TRUTH.items()}
    assert weighted_tau(reversed_, TRUTH) == pytest.approx(-1.0)


@pytest.mark.timeout(60)
def test_weighted_tau_hand_computed():
    # truth w > x > y > z; scores rank w first but put x last: w=4, x=1, y=3, z=2.
    # An exchange of items ranked r and s weighs 1/(r+1) + 1/(s+1); tau = sum(w * sign) / sum(w).
    # Importance ranking by the truth (w0 x1 y2 z3; weights 1, 1/2, 1/3, 1/4), in twelfths:
    #   (w,x) +18  (w,y) +16  (w,z) +15  (x,y) -10  (x,z) -9  (y,z) +7   -> 37/75
    # Importance ranking by the scores (w0 y1 z2 x3; weights 1, 1/2, 1/3, 1/4):
    #   (w,x) +15  (w,y) +18  (w,z) +16  (x,y) -9   (x,z) -7  (y,z) +10  -> 43/75
    # scipy's rank=True averages the two: (37 + 43) / 150 = 8/15.
    truth = {"w": 4.0, "x": 3.0, "y": 2.0, "z": 1.0}
    scores = {"w": 4.0, "x": 1.0, "y": 3.0, "z": 2.0}
    assert weighted_tau(scores, truth) == pytest.approx(8 / 15)
    # symmetric in its two arguments (see the comment in weighted_tau)
    assert weighted_tau(truth, scores) == pytest.approx(8 / 15)


@pytest.mark.timeout(60)
def test_weighted_tau_weighs_the_top_more():
    truth = {"w": 4.0, "x": 3.0, "y": 2.0, "z": 1.0}
    swap_top = {"w": 3.0, "x": 4.0, "y": 2.0, "z": 1.0}
    swap_bottom = {"w": 4.0, "x": 3.0, "y": 1.0, "z": 2.0}
    assert weighted_tau(swap_top, truth) < weighted_tau(swap_bottom, truth) < 1.0


@pytest.mark.timeout(60)
def test_weighted_tau_invariant_to_monotone_transform():
    rng = np.random.default_rng(3)
    ids = [f"m{i}" for i in range(12)]
    truth = dict(zip(ids, rng.uniform(0.5, 0.9, size=12)))
    scores = dict(zip(ids, rng.normal(size=12)))
    transformed = {k: 3.0 * math.exp(v) + 1.0 for k, v in scores.items()}
    assert weighted_tau(transformed, truth) == pytest.approx(weighted_tau(scores, truth))


@pytest.mark.timeout(60)
def test_weighted_tau_uses_shared_ids_and_handles_degenerate_input():
    # ids outside the intersection are ignored
    assert weighted_tau({"a": 1.0, "b": 3.0, "zz": 100.0}, TRUTH) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        weighted_tau({"a": 1.0, "zz": 2.0}, TRUTH)
    assert math.isnan(weighted_tau({"a": 1.0, "b": 1.0, "c": 1.0}, TRUTH))  # constant scores
    assert math.isnan(weighted_tau({"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.5}))  # constant truth


# --- regret and ranking ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_top_k_regret_by_hand():
    # best in the pool: b = 0.85
    assert top_k_regret(["c"], TRUTH) == pytest.approx(0.25)
    assert top_k_regret(["b"], TRUTH) == pytest.approx(0.0)
    assert top_k_regret(["c", "d", "a"], TRUTH, k=3) == pytest.approx(0.05)  # best of c, d, a is d = 0.80
    assert top_k_regret(["c", "d", "a"], TRUTH, k=1) == pytest.approx(0.25)  # only c counts
    # unknown ids are skipped before the first k are taken: picks c, a -> 0.85 - 0.70
    assert top_k_regret(["c", "zz", "a"], TRUTH, k=2) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        top_k_regret(["zz"], TRUTH)
    with pytest.raises(ValueError):
        top_k_regret(["a"], TRUTH, k=0)


@pytest.mark.timeout(60)
def test_ranked_ids_order_ties_and_nan():
    assert ranked_ids({"b": 1.0, "a": 1.0, "c": math.nan, "d": 2.0, "e": -1.0}) == ["d", "a", "b", "e", "c"]


# --- bootstrap ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([0.3] * 7) == (0.3, 0.3)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert bootstrap_ci([0.4, math.nan]) == (0.4, 0.4)
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    lo, hi = bootstrap_ci([math.nan])
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.timeout(60)
def test_bootstrap_ci_contains_mean_is_seeded_and_narrows():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=1000)
    few = values[:10]
    lo, hi = bootstrap_ci(few)
    assert lo <= float(np.mean(few)) <= hi
    assert bootstrap_ci(few, seed=5) == bootstrap_ci(few, seed=5)
    lo_all, hi_all = bootstrap_ci(values)
    assert lo_all <= float(np.mean(values)) <= hi_all
    assert hi_all - lo_all < (hi - lo) / 3  # width ~ 1/sqrt(n): 10 -> 1000 values shrinks it ~10x
    assert bootstrap_ci([1.0, 3.0, math.nan, 2.0]) == bootstrap_ci([1.0, 3.0, 2.0])


# --- summaries ------------------------------------------------------------------------------------


def _records() -> list[dict]:
    return [
        {
            "task": "t1",
            "seed": 0,
            "truth": {"m1": 0.9, "m2": 0.8, "m3": 0.7, "m4": 0.5},
            "methods": {
                # perfect ranking: tau 1, regrets 0
                "a": {"scores": {"m1": 4.0, "m2": 3.0, "m3": 2.0, "m4": 1.0}, "pick": "m1", "seconds": 1.0},
                # no scores: only the pick counts; top-1 regret 0.9 - 0.7
                "b": {"scores": None, "pick": "m3", "seconds": 3.0},
            },
        },
        {
            "task": "t2",
            "seed": 0,
            "truth": {"m1": 0.6, "m2": 0.7, "m3": 0.8, "m4": 0.9},
            "methods": {
                # reversed ranking: tau -1; pick m1 -> 0.9 - 0.6; top-3 m1, m2, m3 -> 0.9 - 0.8
                "a": {"scores": {"m1": 4.0, "m2": 3.0, "m3": 2.0, "m4": 1.0}, "pick": "m1", "seconds": 2.0},
                # two models scored, in the wrong order: tau -1; pick m4 -> 0; top-3 m3, m4 -> 0
                "b": {"scores": {"m3": 2.0, "m4": 1.0}, "pick": "m4", "seconds": 5.0},
            },
        },
    ]


@pytest.mark.timeout(60)
def test_per_record_metrics_by_hand():
    first = per_record_metrics(_records()[0])
    assert first["a"] == pytest.approx({"weighted_tau": 1.0, "top1_regret": 0.0, "top3_regret": 0.0, "seconds": 1.0})
    assert math.isnan(first["b"]["weighted_tau"]) and math.isnan(first["b"]["top3_regret"])
    assert first["b"]["top1_regret"] == pytest.approx(0.2)
    second = per_record_metrics(_records()[1])
    assert second["a"] == pytest.approx({"weighted_tau": -1.0, "top1_regret": 0.3, "top3_regret": 0.1, "seconds": 2.0})
    assert second["b"] == pytest.approx({"weighted_tau": -1.0, "top1_regret": 0.0, "top3_regret": 0.0, "seconds": 5.0})


@pytest.mark.timeout(60)
def test_summarise_methods_by_hand():
    summary = summarise_methods(_records())
    assert list(summary) == ["a", "b"]
    a, b = summary["a"], summary["b"]
    # a: tau {1, -1}; a bootstrap mean of two values is one of them or their mean, and 2000 draws
    # hit both extremes (each with probability 1/4 per draw), so the 95% interval is the full range
    assert a["weighted_tau"] == pytest.approx(0.0)
    assert a["weighted_tau_ci95"] == pytest.approx([-1.0, 1.0])
    assert a["top1_regret"] == pytest.approx(0.15)
    assert a["top1_regret_ci95"] == pytest.approx([0.0, 0.3])
    assert a["top3_regret"] == pytest.approx(0.05)
    assert a["top3_regret_ci95"] == pytest.approx([0.0, 0.1])
    assert a["seconds"] == pytest.approx(1.5)
    assert a["n"] == 2
    assert list(a["per_task"]) == ["t1", "t2"]
    assert a["per_task"]["t1"] == pytest.approx({"weighted_tau": 1.0, "top1_regret": 0.0, "top3_regret": 0.0})
    assert a["per_task"]["t2"] == pytest.approx({"weighted_tau": -1.0, "top1_regret": 0.3, "top3_regret": 0.1})
    # b: tau only defined on t2, so the mean is -1 with a degenerate interval
    assert b["weighted_tau"] == pytest.approx(-1.0)
    assert b["weighted_tau_ci95"] == pytest.approx([-1.0, -1.0])
    assert b["top1_regret"] == pytest.approx(0.1)
    assert b["top1_regret_ci95"] == pytest.approx([0.0, 0.2])
    assert b["top3_regret"] == pytest.approx(0.0)
    assert b["seconds"] == pytest.approx(4.0)
    assert b["n"] == 2
    assert b["per_task"]["t1"]["weighted_tau"] is None
    assert b["per_task"]["t1"]["top3_regret"] is None
    assert b["per_task"]["t1"]["top1_regret"] == pytest.approx(0.2)
    assert isinstance(a["top1_regret"], float) and isinstance(a["weighted_tau_ci95"][0], float)


@pytest.mark.timeout(60)
def test_summary_has_none_never_nan_and_is_json():
    records = _records()
    # a method that only appears in one record, with no scores and an unknown pick
    records[1]["methods"]["c"] = {"scores": None, "pick": "nowhere", "seconds": None}
    summary = summarise_methods(records)
    c = summary["c"]
    assert c["n"] == 0
    for name in ("weighted_tau", "top1_regret", "top3_regret", "seconds"):
        assert c[name] is None
    assert c["top1_regret_ci95"] == [None, None]
    assert c["per_task"]["t1"] == {"weighted_tau": None, "top1_regret": None, "top3_regret": None}
    json.dumps(summary, allow_nan=False)  # raises on any nan or inf


@pytest.mark.timeout(60)
def test_summarise_averages_seeds_within_a_task():
    records = _records()
    again = {**records[0], "seed": 1, "methods": {"a": {**records[0]["methods"]["a"], "pick": "m4"}}}
    summary = summarise_methods([records[0], again])
    # t1 top-1 regret: seed 0 -> 0, seed 1 -> 0.9 - 0.5
    assert summary["a"]["per_task"]["t1"]["top1_regret"] == pytest.approx(0.2)
    assert summary["b"]["n"] == 1  # b is missing from the second record


@pytest.mark.timeout(60)
def test_wins_or_ties():
    summary = summarise_methods(_records())
    assert wins_or_ties(summary, "a", "b") == (1, 2)  # t1: 0 <= 0.2; t2: 0.3 > 0
    assert wins_or_ties(summary, "b", "a") == (1, 2)
    tied = {
        # t1: x is worse than y by 5e-10, within the 1e-9 tolerance: a tie, which counts for both
        "x": {"per_task": {"t1": {"top1_regret": 0.1 + 5e-10}, "t2": {"top1_regret": 0.2},
                           "t3": {"top1_regret": None}}},
        "y": {"per_task": {"t1": {"top1_regret": 0.1}, "t2": {"top1_regret": 0.1}, "t3": {"top1_regret": 0.0}}},
    }
    assert wins_or_ties(tied, "x", "y") == (1, 2)  # t3 is not compared (x has no value)
    assert wins_or_ties(tied, "y", "x") == (2, 2)
    with pytest.raises(KeyError):
        wins_or_ties(tied, "x", "missing")
