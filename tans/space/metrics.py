"""Validation metrics of a cross-modal space on held-out tasks, and the baselines they beat.

A val task's query is scored against the *full* index (every task's models, the val tasks' own
models included). The target is the val task's best model: the row of that task with the highest
measured accuracy, or any of them where several tie (accuracies are counts over one test set, so
exact ties happen; taking the first tied row made the metric, and the checkpoint chosen by it,
depend on row order: on one meta-val task the "best" model's rank moved between ~45 and ~200 from
one space seed to the next while the tied model was ranked well). All functions return plain
dicts of floats, ready for metrics.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from scipy.stats import kendalltau

DEFAULT_KS = (1, 5, 10)


def best_row_sets(index_tasks: Sequence[str], index_accuracy, val_tasks: Sequence[str]) -> list[np.ndarray]:
    """For each val task, the rows of its most accurate models (all rows tied at the top)."""
    tasks = np.asarray(index_tasks, dtype=object)
    acc = np.asarray(index_accuracy, dtype=float)
    out = []
    for t in val_tasks:
        rows = np.flatnonzero(tasks == t)
        if rows.size == 0:
            raise ValueError(f"val task {t!r} has no model in the index")
        out.append(rows[acc[rows] >= acc[rows].max() - 1e-12])
    return out


def ranks_of_best(scores, index_tasks, index_accuracy, val_tasks) -> np.ndarray:
    """1-based rank of each val task's best model in its query's ranking of the full index.

    ``scores``: Q x N similarities (row q = val query q, whose task is ``val_tasks[q]``).
    Rank = 1 + number of rows scored strictly higher than the best-scored of the task's tied-best
    models (ties in score, like ties in accuracy, are resolved in the model's favour).
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[0] != len(val_tasks):
        raise ValueError(f"scores must be (n_val_queries={len(val_tasks)}) x N, got shape {scores.shape}")
    best = best_row_sets(index_tasks, index_accuracy, val_tasks)
    target = np.array([scores[q, rows].max() for q, rows in enumerate(best)])
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


def random_baseline(
    n_index: int, ks: Sequence[int] = DEFAULT_KS, n_best: Sequence[int] | None = None
) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of an N-row index, computed exactly.

    ``n_best``: for each val query, how many models tie for its task's best (default: 1 each). With
    m targets the rank of the first one to come up has P(rank <= r) = 1 - C(N - m, r) / C(N, r):
    R@k is that at r = k, the mean rank is (N + 1) / (m + 1), and the median rank is where the
    queries' mean CDF reaches 1/2 (midway between r and r + 1 when it is exactly 1/2 at r, as
    numpy's median of an even count; (N + 1) / 2 when m = 1). Expected Kendall tau is 0.
    """
    if n_index < 1:
        raise ValueError(f"n_index must be >= 1, got {n_index}")
    ms = list(n_best) if n_best is not None else [1]
    if not ms or min(ms) < 1 or max(ms) > n_index:
        raise ValueError(f"n_best must be between 1 and n_index={n_index}, got {ms}")

    def cdf(r: int) -> Fraction:  # exact: R@k of 1 target out of 20 is 0.05, not 0.05000000000000004
        return sum((1 - Fraction(math.comb(n_index - m, r), math.comb(n_index, r)) for m in ms), Fraction(0)) / len(ms)

    out = {f"R@{k}": float(cdf(min(k, n_index))) for k in ks}
    out["mean_rank"] = float(sum(Fraction(n_index + 1, m + 1) for m in ms) / len(ms))
    r = next(r for r in range(1, n_index + 1) if cdf(r) >= Fraction(1, 2))
    out["median_rank"] = r + 0.5 if cdf(r) == Fraction(1, 2) else float(r)
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
        "random": random_baseline(np.asarray(scores).shape[1], ks,
                                  n_best=[len(rows) for rows in best_row_sets(index_tasks, index_accuracy, val_tasks)]),
        "size": size_baseline(index_n_params, index_accuracy, index_tasks, val_tasks),
    }
    return out
