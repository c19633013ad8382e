"""Validation metrics of a cross-modal space on held-out tasks, and the baselines they beat.

A val task's query is scored against the *full* index (every task's models, the val tasks' own
models included). The target is the val task's best model: the row of that task with the highest
measured accuracy. All functions return plain dicts of floats, ready for metrics.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau

DEFAULT_KS = (1, 5, 10)


def best_rows(index_tasks: Sequence[str], index_accuracy, val_tasks: Sequence[str]) -> np.ndarray:
    """Row of the most accurate model of each val task (first row on a tie)."""
    tasks = np.asarray(index_tasks, dtype=object)
    acc = np.asarray(index_accuracy, dtype=float)
    out = []
    for t in val_tasks:
        rows = np.flatnonzero(tasks == t)
        if rows.size == 0:
            raise ValueError(f"val task {t!r} has no model in the index")
        out.append(rows[np.argmax(acc[rows])])
    return np.asarray(out, dtype=np.int64)


def ranks_of_best(scores, index_tasks, index_accuracy, val_tasks) -> np.ndarray:
    """1-based rank of each val task's best model in its query's ranking of the full index.

    ``scores``: Q x N similarities (row q = val query q, whose task is ``val_tasks[q]``).
    Rank = 1 + number of rows scored strictly higher (ties are resolved in the model's favour).
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[0] != len(val_tasks):
        raise ValueError(f"scores must be (n_val_queries={len(val_tasks)}) x N, got shape {scores.shape}")
    best = best_rows(index_tasks, index_accuracy, val_tasks)
    target = scores[np.arange(len(best)), best]
    return 1 + (scores > target[:, None]).sum(axis=1)


def rank_summary(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k (share of ranks <= k), mean_rank and median_rank of 1-based ranks."""
    ranks = np.asarray(ranks, dtype=float)
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mean_rank"] = float(np.mean(ranks))
    out["median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics(
    scores, index_tasks, index_accuracy, val_tasks, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """R@k, mean_rank, median_rank of the val tasks' best models (see ``ranks_of_best``)."""
    return rank_summary(ranks_of_best(scores, index_tasks, index_accuracy, val_tasks), ks)


def _mean_tau(x, y, tasks, val_tasks) -> float:
    """Kendall tau of x vs y within each val task, averaged; tasks where tau is undefined are skipped."""
    tasks = np.asarray(tasks, dtype=object)
    taus = []
    for t in dict.fromkeys(val_tasks):  # unique, in order
        rows = tasks == t
        if rows.sum() < 2:
            continue
        tau = kendalltau(np.asarray(x)[rows], np.asarray(y)[rows]).statistic
        if np.isfinite(tau):  # nan when either side is constant
            taus.append(tau)
    return float(np.mean(taus)) if taus else float("nan")


def predictor_metrics(predicted, true, index_tasks, val_tasks) -> dict[str, float]:
    """rmse and mean per-task kendall_tau of predicted vs true accuracy on the val tasks' own rows.

    ``predicted``: for each index row, the predictor's accuracy for that row's own task's query.
    """
    tasks = np.asarray(index_tasks, dtype=object)
    predicted, true = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
    rows = np.isin(tasks, list(val_tasks))
    rmse = float(np.sqrt(np.mean((predicted[rows] - true[rows]) ** 2))) if rows.any() else float("nan")
    return {"rmse": rmse, "kendall_tau": _mean_tau(predicted, true, tasks, val_tasks)}


def random_baseline(n_index: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of an N-row index, computed exactly.

    The target's rank is uniform on 1..N: R@k = min(k, N) / N, mean rank = (N + 1) / 2, and the
    median rank of that distribution is (N + 1) / 2 as well. Expected Kendall tau is 0.
    """
    if n_index < 1:
        raise ValueError(f"n_index must be >= 1, got {n_index}")
    out = {f"R@{k}": min(k, n_index) / n_index for k in ks}
    out["mean_rank"] = (n_index + 1) / 2
    out["median_rank"] = (n_index + 1) / 2
    out["kendall_tau"] = 0.0
    return out


def size_baseline(n_params, accuracy, index_tasks, val_tasks) -> dict[str, float]:
    """The "bigger is better" heuristic: mean per-task Kendall tau of n_params vs accuracy."""
    return {"kendall_tau": _mean_tau(np.asarray(n_params, dtype=float), accuracy, index_tasks, val_tasks)}


def space_metrics(scores, predicted, index_tasks, index_accuracy, index_n_params, val_tasks, ks=DEFAULT_KS) -> dict:
    """The ``val`` object of metrics.json: retrieval + predictor metrics and both baselines."""
    out: dict = retrieval_metrics(scores, index_tasks, index_accuracy, val_tasks, ks)
    out.update(predictor_metrics(predicted, index_accuracy, index_tasks, val_tasks))
    out["baselines"] = {
        "random": random_baseline(np.asarray(scores).shape[1], ks),
        "size": size_baseline(index_n_params, index_accuracy, index_tasks, val_tasks),
    }
    return out
