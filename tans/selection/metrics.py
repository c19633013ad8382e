"""Metrics of the model-selection protocol: how well a selector ranks and picks zoo models for a task.

A *selector* (TANS retrieval, LogME, H-score, N-LEEP, a linear probe, ...) scores every candidate
model of a pool for a target task and picks one; the *ground truth* is each model's accuracy after
fine-tuning on that task. Two views of quality are reported, the ones the transferability
literature uses (LogME, You et al. 2021; Model Spider, Zhang et al. 2023; Transfer-Learning-Library):

* ranking quality: the weighted Kendall tau between scores and accuracies (hyperbolic weights, so a
  swap among the best models costs more than a swap among the worst);
* decision quality: the *regret* of the pick, i.e. best accuracy in the pool minus the accuracy of
  the picked model (top-1), or of the best of the first three ranked models (top-3).

Means over (task, seed) records come with percentile-bootstrap 95% intervals. Everything returned by
:func:`summarise_methods` is JSON-ready: ``None`` stands for "undefined" (json cannot hold nan).

numpy + scipy only (no torch, no ray), so reports can be recomputed anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import weightedtau

METRICS = ("weighted_tau", "top1_regret", "top3_regret", "seconds")
TIE_TOL = 1e-9  # regrets are differences of accuracies; closer than this is a tie


def weighted_tau(scores: Mapping[str, float], truth: Mapping[str, float]) -> float:
    """Weighted Kendall tau between a selector's ``scores`` and ground-truth accuracies ``truth``.

    Computed over the model ids present in both mappings (``ValueError`` if fewer than 2). Ids whose
    score or accuracy is not finite are then dropped (a selector that failed on a model ranks it
    nowhere); nan is returned when fewer than 2 remain or when either vector is constant (the
    correlation is undefined, not an error of the caller).
    """
    shared = sorted(set(scores) & set(truth))
    if len(shared) < 2:
        raise ValueError(f"weighted tau needs at least 2 models scored and in the ground truth, got {len(shared)}")
    t = np.array([float(truth[i]) for i in shared], dtype=np.float64)
    s = np.array([float(scores[i]) for i in shared], dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(s)
    t, s = t[keep], s[keep]
    if t.size < 2 or np.ptp(t) == 0 or np.ptp(s) == 0:
        return math.nan
    # scipy ranks "importance" by *decreasing* value (rank 0 = largest), so both accuracies and
    # scores are passed as-is (higher = better): the heavily weighted elements are the top models.
    # weigher=None gives hyperbolic weights 1/(r+1) added per exchange. rank=True averages the tau
    # obtained with the importance ranking of the truth and with that of the scores, which makes the
    # value symmetric in the two arguments; the order (truth, scores) below therefore does not
    # change the result, and this is exactly what LogME / Model Spider / Transfer-Learning-Library
    # report (they call ``scipy.stats.weightedtau`` with its defaults).
    tau = weightedtau(t, s, weigher=None, rank=True).statistic
    return float(tau)


def ranked_ids(scores: Mapping[str, float]) -> list[str]:
    """Ids sorted by score, best first; ties broken by id (deterministic), nan scores last."""

    def key(item: tuple[str, float]) -> tuple[bool, float, str]:
        ident, value = item
        v = float(value) if value is not None else math.nan
        bad = math.isnan(v)
        return bad, (0.0 if bad else -v), ident

    return [ident for ident, _ in sorted(scores.items(), key=key)]


def top_k_regret(pick_ids: Sequence[str], truth: Mapping[str, float], k: int = 1) -> float:
    """Best accuracy in the pool minus the best accuracy among the first ``k`` picks.

    ``pick_ids`` is ordered best-first; ids not in ``truth`` are skipped before the first ``k`` are
    taken (an unknown model is treated as if the selector had not proposed it). ``ValueError`` if no
    pick is in ``truth`` or ``k < 1``. Non-finite accuracies are ignored on both sides.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    known = [p for p in pick_ids if p in truth][:k]
    if not known:
        raise ValueError("none of the picked models is in the ground truth")
    pool = [float(v) for v in truth.values() if math.isfinite(float(v))]
    picked = [float(truth[p]) for p in known if math.isfinite(float(truth[p]))]
    if not pool or not picked:
        return math.nan
    return max(pool) - max(picked)


def bootstrap_ci(
    values: Iterable[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval of the mean of ``values`` (nan values dropped).

    One value gives ``(v, v)``; none gives ``(nan, nan)``. Deterministic for a given ``seed``.
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1 or np.ptp(v) == 0:
        # exact, rather than a float mean of copies of v[0] that may differ in the last bit
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    # resample in chunks so that n_boot x n index arrays stay small for long vectors
    chunk = max(1, min(n_boot, 2_000_000 // v.size))
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the non-nan values, nan if there are none (np.nanmean would warn)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _json_float(x: float) -> float | None:
    """A Python float, or None for nan / inf (json cannot hold them)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _as_float(x: Any) -> float:
    return math.nan if x is None else float(x)


def per_record_metrics(record: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per method of one ``(task, seed)`` record: ``weighted_tau``, ``top1_regret``, ``top3_regret``, ``seconds``.

    ``record`` is ``{"task", "seed", "truth": {id: acc}, "methods": {key: {"scores", "pick", "seconds"}}}``.
    A metric that cannot be computed (no scores, fewer than 2 scored models, pick unknown) is nan.
    """
    truth = {str(k): float(v) for k, v in record["truth"].items()}
    out: dict[str, dict[str, float]] = {}
    for key, m in record.get("methods", {}).items():
        scores = m.get("scores")
        scores = None if scores is None else {str(k): _as_float(v) for k, v in scores.items()}
        tau = top3 = math.nan
        if scores is not None:
            if len(set(scores) & set(truth)) >= 2:
                tau = weighted_tau(scores, truth)
            ranked = [i for i in ranked_ids(scores) if i in truth]
            if ranked:
                top3 = top_k_regret(ranked, truth, k=3)
        pick = m.get("pick")
        top1 = top_k_regret([str(pick)], truth, k=1) if pick is not None and str(pick) in truth else math.nan
        seconds = _as_float(m.get("seconds"))
        out[key] = {"weighted_tau": tau, "top1_regret": top1, "top3_regret": top3, "seconds": seconds}
    return out


def summarise_methods(per_target: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Means, bootstrap 95% intervals and per-task means of every method's metrics over the records.

    Returns ``{key: {"weighted_tau", "weighted_tau_ci95", "top1_regret", "top1_regret_ci95",
    "top3_regret", "top3_regret_ci95", "seconds", "n", "per_task": {task: {"weighted_tau",
    "top1_regret", "top3_regret"}}}}``. Means ignore nan (a record that lacks a method, or a metric a
    method cannot provide, does not count); ``n`` is the number of records with a finite top-1
    regret. Undefined values are ``None``. Methods and tasks keep their order of first appearance.
    """
    per_record = [per_record_metrics(r) for r in per_target]
    keys: list[str] = []
    for metrics in per_record:
        keys.extend(k for k in metrics if k not in keys)
    tasks: list[str] = []
    for r in per_target:
        if str(r["task"]) not in tasks:
            tasks.append(str(r["task"]))
    missing = dict.fromkeys(METRICS, math.nan)

    summary: dict[str, dict[str, Any]] = {}
    for key in keys:
        rows = [(str(r["task"]), metrics.get(key, missing)) for r, metrics in zip(per_target, per_record)]
        entry: dict[str, Any] = {}
        for name in ("weighted_tau", "top1_regret", "top3_regret"):
            values = [row[name] for _, row in rows]
            entry[name] = _json_float(_nanmean(values))
            entry[f"{name}_ci95"] = [_json_float(b) for b in bootstrap_ci(values)]
        entry["seconds"] = _json_float(_nanmean(row["seconds"] for _, row in rows))
        entry["n"] = sum(1 for _, row in rows if math.isfinite(row["top1_regret"]))
        entry["per_task"] = {
            task: {
                name: _json_float(_nanmean(row[name] for t, row in rows if t == task))
                for name in ("weighted_tau", "top1_regret", "top3_regret")
            }
            for task in tasks
        }
        summary[key] = entry
    return summary


def wins_or_ties(summary: Mapping[str, Mapping[str, Any]], a: str, b: str) -> tuple[int, int]:
    """``(wins_or_ties, compared)``: tasks where method ``a``'s mean top-1 regret is <= ``b``'s.

    Only tasks where both per-task regrets are defined (not None) are compared; a difference within
    1e-9 counts as a tie, hence for ``a``. ``KeyError`` if either method is not in ``summary``.
    """
    for name in (a, b):
        if name not in summary:
            raise KeyError(f"method {name!r} is not in the summary (have {sorted(summary)})")
    tasks_a, tasks_b = summary[a]["per_task"], summary[b]["per_task"]
    wins = compared = 0
    for task, row in tasks_a.items():
        ra = row.get("top1_regret")
        rb = tasks_b.get(task, {}).get("top1_regret")
        if ra is None or rb is None:
            continue
        compared += 1
        wins += ra <= rb + TIE_TOL
    return wins, compared
