"""The nearest-dataset prior that retrieval blends with the space's own score.

Every zoo task with a stored query has a *mean query feature* (the frozen extractor's features of
its query images, averaged). A target's nearness to a zoo task is the cosine between the two means;
the prior of a zoo model is its task's nearness rank, with the model's zoo accuracy breaking ties
within a task. ``tans search``, ``tans evaluate`` (method ``nearest_dataset``) and the Serve index
all compute it here, so the three rank alike. No ``import ray`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tans.storage import Storage

# z(predicted accuracy) + 0.5 * z(prior): the weight chosen, with the task-features space, on
# meta_val and held-out meta_train sources over 3 space seeds (README "Evaluation"); 0 ranks by
# the space alone.
DEFAULT_PRIOR_WEIGHT = 0.5


def zoo_task_means(space_root: Storage, info: dict) -> dict[str, np.ndarray]:
    """Mean query feature of every zoo task of the space (``info``: its space.json) that has a
    stored query under ``space_root`` (the storage root the space lives in)."""
    from tans.space.features import read_query

    means = {}
    for t in [*info.get("train_tasks", []), *info.get("val_tasks", [])]:
        try:
            means[t] = read_query(space_root, info["extractor"]["name"], t)[0].mean(axis=0)
        except Exception:  # a task without a stored query is simply not a neighbour
            continue
    return means


def task_cosines(target_mean: np.ndarray, task_means: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Cosine between ``target_mean`` and each named task's mean feature. Each vector is
    normalised on its own (a tiny-normed feature vector still has a direction), and a zero vector
    gives 0 rather than a division by zero."""
    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        n = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.where(n > 0, n, 1.0)

    return unit(np.stack([task_means[t] for t in names])) @ unit(target_mean) if len(names) else np.zeros(0)


def nearest_dataset_scores(target_mean: np.ndarray, task_means: dict[str, np.ndarray], ids: Sequence[str],
                           tasks: Sequence[str], accuracy: Sequence[float]) -> dict[str, float]:
    """Nearest-dataset scores of models: zoo tasks ordered by the cosine between mean extractor
    features, and within a task by the model's zoo accuracy.

    The score is ``-rank_of_task + zoo_accuracy`` (accuracy in [0, 1] never crosses a task
    boundary), so the best-scored model is the most accurate model of the nearest task.
    A model whose task has no stored query ranks after every task that has one.
    """
    names = sorted(set(tasks) & set(task_means))
    sims = dict(zip(names, task_cosines(target_mean, task_means, names).tolist()))
    rank = {t: r for r, t in enumerate(sorted(names, key=lambda t: -sims[t]))}
    worst = len(names)
    return {m: float(-rank.get(t, worst) + float(a)) for m, t, a in zip(ids, tasks, accuracy)}


def task_codes(tasks: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct task names, each row's index into them): computed once per index, so that
    :func:`row_prior` costs no Python loop over the rows."""
    uniq, inverse = np.unique(np.asarray(tasks, dtype=str), return_inverse=True)
    return uniq, inverse.reshape(-1)


def row_prior(target_mean: np.ndarray, task_means: dict[str, np.ndarray], tasks: Sequence[str] | np.ndarray,
              accuracy: Sequence[float] | np.ndarray,
              codes: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """:func:`nearest_dataset_scores` of every index row, in row order, vectorised over the rows
    (``codes``: :func:`task_codes` of ``tasks``, when the caller keeps them); None when no zoo task
    has a stored query (then there is no prior and retrieval ranks by the space alone)."""
    if not task_means:
        return None
    uniq, inverse = codes if codes is not None else task_codes(tasks)
    names = sorted(set(uniq.tolist()) & set(task_means))
    sims = task_cosines(target_mean, task_means, names).tolist()
    rank = {t: r for r, t in enumerate(sorted(names, key=lambda t: -sims[names.index(t)]))}
    rank_of_task = np.array([rank.get(t, len(names)) for t in uniq.tolist()], dtype=np.float64)
    return -rank_of_task[inverse] + np.asarray(accuracy, dtype=np.float64)
