"""The selection protocol's Ray-free pieces: which models a target may use, the pool sample, the cheap selectors."""

from __future__ import annotations

import numpy as np
import pytest

from tans.selection.evaluation import (
    METHODS,
    evaluation_markdown,
    excluded_tasks,
    pool_stats,
    random_scores,
    sample_pool,
    size_scores,
    source_key,
    tans_search_pick,
)
from tans.space.prior import nearest_dataset_scores


def test_source_key_and_exclusion_of_the_targets_own_source():
    assert source_key("builtin:greek (114 fonts of Debian font packages)") == "builtin:greek"
    assert source_key("/data/my_folder") == "/data/my_folder"
    zoo = {"greek_0_10": "builtin:greek (114 fonts)", "greek_10_19": "builtin:greek (114 fonts)",
           "latin_0_10": "builtin:latin (80 fonts)", "mine": ""}
    # a zoo task as the target: every task of its source leaves
    assert excluded_tasks("greek_0_10", "builtin:greek (114 fonts)", zoo) == {"greek_0_10", "greek_10_19"}
    # an unseen ImageFolder shares no source; an empty source never matches the empty ones
    assert excluded_tasks("flowers", "/tmp/flowers", zoo) == set()
    assert excluded_tasks("x", "", zoo) == set()


def _zoo(n_tasks=10, per_task=6):
    tasks = np.asarray([f"t{i}" for i in range(n_tasks) for _ in range(per_task)], dtype=object)
    n_params = np.asarray([1000 * (j + 1) for _ in range(n_tasks) for j in range(per_task)], dtype=np.int64)
    return tasks, n_params


def test_sample_pool_is_stratified_seeded_and_spans_sizes():
    tasks, n_params = _zoo()
    rows = np.arange(len(tasks))
    pool = sample_pool(rows, tasks, n_params, cap=16, seed=0)
    assert len(pool) == 16 and len(set(pool.tolist())) == 16 and np.all(np.diff(pool) > 0)
    counts = np.unique(tasks[pool], return_counts=True)[1]
    assert len(counts) == 10 and counts.max() - counts.min() <= 1  # every task before any gets a third
    assert np.array_equal(pool, sample_pool(rows, tasks, n_params, cap=16, seed=0))  # seeded
    assert not np.array_equal(pool, sample_pool(rows, tasks, n_params, cap=16, seed=1))
    # tasks with two picks got one from the small half and one from the large half
    for t in np.unique(tasks[pool]):
        sizes = sorted(n_params[pool][tasks[pool] == t])
        if len(sizes) == 2:
            assert sizes[0] <= 3000 < sizes[1]
    # a pool no larger than the cap is the whole allowed set; cap 0 means all
    assert np.array_equal(sample_pool(rows[:5], tasks, n_params, cap=16, seed=0), rows[:5])
    assert len(sample_pool(rows, tasks, n_params, cap=0, seed=0)) == len(rows)


def test_pool_stats_counts_tasks_and_architectures():
    tasks = np.asarray(["a", "a", "b", "c"], dtype=object)
    archs = [(1,), (2,), (1,), (3,)]
    assert pool_stats(np.asarray([0, 1, 2, 3]), tasks, archs) == {"models": 4, "zoo_tasks": 3, "architectures": 3}
    assert pool_stats(np.asarray([0, 2]), tasks, archs) == {"models": 2, "zoo_tasks": 2, "architectures": 1}


def test_nearest_dataset_orders_tasks_by_cosine_then_zoo_accuracy():
    means = {"near": np.array([1.0, 0.1]), "far": np.array([0.0, 1.0])}
    ids = ["n1", "n2", "f1", "q1"]
    scores = nearest_dataset_scores(np.array([1.0, 0.0]), means, ids, ["near", "near", "far", "noquery"],
                                    [0.2, 0.9, 0.99, 1.0])
    assert sorted(ids, key=lambda i: -scores[i]) == ["n2", "n1", "f1", "q1"]
    # only directions count: features of a tiny scale (an untrained extractor's) order tasks alike
    tiny = nearest_dataset_scores(np.array([1e-9, 0.0]), {t: 1e-9 * m for t, m in means.items()}, ids,
                                  ["near", "near", "far", "noquery"], [0.2, 0.9, 0.99, 1.0])
    assert tiny == scores


def test_size_random_and_the_search_pick():
    assert size_scores(["a", "b"], [10, 5]) == {"a": 10.0, "b": 5.0}
    r0, r1 = random_scores(["a", "b", "c"], 0), random_scores(["a", "b", "c"], 1)
    assert r0 == random_scores(["a", "b", "c"], 0) and r0 != r1
    # the best validation accuracy among the fine-tuned candidates; ties to the earlier one
    truth = {"a": {"val_accuracy": 0.5, "val_loss": 0.9}, "b": {"val_accuracy": 0.7, "val_loss": 1.2},
             "c": {"val_accuracy": 0.7, "val_loss": 0.4}, "d": {"val_accuracy": 0.5, "val_loss": 0.4}}
    assert tans_search_pick(["a", "b", "c"], truth) == "b"
    # by validation loss: the lowest; ties to the earlier one; models not fine-tuned are skipped
    assert tans_search_pick(["a", "b", "c", "d"], truth, "val_loss") == "c"
    assert tans_search_pick(["d", "c"], truth, "val_loss") == "d"
    assert tans_search_pick(["x", "a"], truth, "val_loss") == "a"
    # a record without losses (made before they were kept): accuracy decides for every candidate
    assert tans_search_pick(["a", "b", "e"], {**truth, "e": {"val_accuracy": 0.6}}, "val_loss") == "b"
    assert tans_search_pick(["a", "b"], {"a": {"val_accuracy": None}, "b": {"val_accuracy": 0.1}}) == "b"
    assert tans_search_pick(["a"], {"a": {"val_accuracy": None}}) is None
    with pytest.raises(ValueError, match="select_by must be one of"):
        tans_search_pick(["a"], truth, "test_accuracy")


@pytest.mark.timeout(60)
def test_markdown_puts_the_summary_table_first():
    from tans.selection.metrics import summarise_methods

    truth = {"a": 0.9, "b": 0.5, "c": 0.7}
    methods = {"tans_similarity": {"scores": {"a": 3.0, "b": 1.0, "c": 2.0}, "pick": "a", "seconds": 0.1},
               "logme": {"scores": {"a": 1.0, "b": 3.0, "c": 2.0}, "pick": "b", "seconds": 2.0},
               "nearest_dataset": {"scores": {"a": 1.0, "b": 2.0, "c": 3.0}, "pick": "c", "seconds": 0.2}}
    record = {"task": "t", "seed": 0, "pool": list(truth),
              "pool_stats": {"models": 3, "zoo_tasks": 2, "architectures": 3},
              "ground_truth": {k: {"test_accuracy": v} for k, v in truth.items()}, "references": {}, "methods": methods}
    summary = summarise_methods([{"task": "t", "seed": 0, "truth": truth, "methods": methods}])
    ev = {"run": "r", "settings": {"seeds": [0], "constraints": {"max_params": 100}, "recipe": {"epochs": 3, "lr": 0.02,
          "config": "demo.yaml"}}, "space": {"run": "s", "zoo": "z"}, "targets": [record], "summary": summary}
    md = evaluation_markdown(ev)
    table = md.split("| method |", 1)[1]
    assert md.index("| method |") < md.index("## Top-1 regret per task")
    assert "| `tans_similarity` | 1.000" in table and "| `logme` |" in table
    assert "| t | 90.0 |" in md  # best in pool, per task
    assert set(summary) <= set(METHODS)
    assert "τ is undefined" not in md

    # a saturated target (every pool model at 100 %): the report says why its τ is "—"
    flat = {k: 1.0 for k in truth}
    tied = dict(record, seed=1, ground_truth={k: {"test_accuracy": v} for k, v in flat.items()})
    summary = summarise_methods([{"task": "t", "seed": 1, "truth": flat, "methods": methods}])
    md = evaluation_markdown(dict(ev, targets=[tied], summary=summary))
    assert "| `tans_similarity` | — |" in md
    assert "τ is undefined (—) for 1 record(s)" in md and ": t s1." in md


def test_the_row_prior_is_the_nearest_dataset_score_of_every_row():
    """tans.space.prior.row_prior (vectorised, what retrieval blends in) equals nearest_dataset_scores."""
    from tans.space.prior import row_prior, task_codes

    rng = np.random.default_rng(3)
    means = {f"t{i}": rng.normal(size=6) for i in range(5)}
    tasks = [f"t{i}" for i in rng.integers(0, 7, 200)]  # t5, t6: no stored query
    accuracy = rng.uniform(0, 1, 200)
    target = rng.normal(size=6)
    ids = [str(i) for i in range(200)]
    expected = nearest_dataset_scores(target, means, ids, tasks, accuracy)
    got = row_prior(target, means, tasks, accuracy)
    assert got.tolist() == pytest.approx([expected[i] for i in ids])
    assert row_prior(target, means, tasks, accuracy, codes=task_codes(tasks)).tolist() == got.tolist()
    assert row_prior(target, {}, tasks, accuracy) is None
