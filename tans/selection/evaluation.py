"""The model-selection protocol, without Ray: pools, the cheap selectors, records and the report.

``tans evaluate`` (``jobs/evaluate.py``) judges every selector the way the transferability
literature does (LogME, Model Spider, the Transfer-Learning-Library): for a target dataset and a
seed it fine-tunes every model of an *evaluation pool* with one fixed recipe (the ground truth),
lets every selector score the same pool, and measures how well each score ranks the ground truth
(weighted Kendall tau) and how much accuracy its pick loses against the best model (regret).
This module holds what does not depend on where things run:

* :func:`excluded_tasks` and :func:`sample_pool`: which zoo models may be chosen for a target;
* the selectors that need no network: ``nearest_dataset``, ``size``, ``random``, and the
  ``tans_search`` pick made from ground-truth trials it would have run itself;
* :func:`evaluation_markdown` and :func:`plot_evaluation`: the report a person reads.

The metrics themselves are :mod:`tans.selection.metrics`; the transferability scores
(LogME, H-score, N-LEEP, linear probe) are :mod:`tans.selection.transferability`.
"""

from __future__ import annotations

import numpy as np

# Method keys, in the order the report lists them.
# tans_retrieval: the order `tans search` retrieves in (the predictor's score blended with the
# nearest-dataset score when the recipe's prior_weight > 0, else the similarity)
TANS_METHODS = ("tans_similarity", "tans_predicted", "tans_retrieval", "tans_search")
FEATURE_METHODS = ("logme", "hscore", "nleep", "linear_probe")  # score frozen features of every pool model
CHEAP_METHODS = ("nearest_dataset", "size", "random")
METHODS = TANS_METHODS + FEATURE_METHODS + CHEAP_METHODS
REFERENCES = ("scratch", "generic", "scratch_long")  # fine-tunes outside the pool, for scale


def source_key(source: str) -> str:
    """The part of a task's ``source`` that names where its images come from.

    ``builtin:greek (114 fonts ...)`` -> ``builtin:greek``; an ImageFolder's path stays as it is.
    """
    return source.split(" (", 1)[0].strip()


def excluded_tasks(target_task: str, target_source: str, zoo_sources: dict[str, str]) -> set[str]:
    """Zoo tasks a target must not be matched with: itself and every task of its source.

    A zoo task's models were fine-tuned on (a part of) the target's source, so keeping them would
    let a selector win by recognising the data rather than by predicting transfer.
    """
    key = source_key(target_source)
    return {t for t, s in zoo_sources.items() if t == target_task or (key and source_key(s) == key)}


def sample_pool(rows: np.ndarray, tasks: np.ndarray, n_params: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """``rows`` itself when ``len(rows) <= cap``, else a seeded sample of ``cap`` of them.

    Stratified over zoo tasks (round-robin over the tasks in a seeded order, so every task is
    represented before any gets a second model) and over sizes (each task's models are taken
    alternately from the small and the large end of a seeded shuffle, so a pool spans sizes).
    Returns sorted row indices.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if cap <= 0 or len(rows) <= cap:
        return np.sort(rows)
    rng = np.random.default_rng([seed, 13])
    queues = []
    for task in rng.permutation(sorted(set(tasks[rows].tolist()))):
        mine = rows[tasks[rows] == task]
        mine = mine[rng.permutation(len(mine))]  # random among equal sizes
        by_size = mine[np.argsort(n_params[mine], kind="stable")]
        small, large = list(by_size[: (len(by_size) + 1) // 2]), list(by_size[(len(by_size) + 1) // 2:][::-1])
        rng.shuffle(small), rng.shuffle(large)
        first_large = bool(rng.integers(2))
        order = []
        while small or large:
            for side in ((large, small) if first_large else (small, large)):
                if side:
                    order.append(side.pop())
        queues.append(order)
    picked: list[int] = []
    while len(picked) < cap:
        for q in queues:
            if q and len(picked) < cap:
                picked.append(int(q.pop(0)))
    return np.sort(np.asarray(picked, dtype=np.int64))


def pool_stats(pool: np.ndarray, tasks: np.ndarray, archs: list[tuple]) -> dict:
    """How varied a pool is: models, zoo tasks and distinct architectures in it."""
    return {"models": int(len(pool)), "zoo_tasks": len(set(tasks[pool].tolist())),
            "architectures": len({archs[i] for i in pool})}


# -- selectors that need no network -------------------------------------------------------------------


def size_scores(ids: list[str], n_params: list[int]) -> dict[str, float]:
    """Bigger is better: the prior a user without a selector falls back on."""
    return {m: float(n) for m, n in zip(ids, n_params)}


def random_scores(ids: list[str], seed: int) -> dict[str, float]:
    """A seeded random order of the pool (the chance level of every metric)."""
    rng = np.random.default_rng([seed, 17])
    return {m: float(v) for m, v in zip(ids, rng.random(len(ids)))}


def tans_search_pick(finetuned: list[str], truth: dict[str, dict], select_by: str = "val_accuracy") -> str | None:
    """The model ``tans search`` returns: of the candidates it fine-tunes (best-ranked first), the
    one its rule ``select_by`` chooses on validation
    (:func:`tans.selection.search.pick_by_validation`: ties go to the earlier candidate).

    ``truth`` holds the ground-truth fine-tunes' records, which use the search's own recipe, split
    and seed: their ``val_accuracy`` and ``val_loss`` are what the search would have seen.
    """
    from tans.selection.search import pick_by_validation

    entries = [(m, (truth.get(m) or {}).get("val_accuracy"), (truth.get(m) or {}).get("val_loss")) for m in finetuned]
    return pick_by_validation(entries, select_by)


# -- the report -----------------------------------------------------------------------------------------


def _num(x, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def _ci(ci, pct: bool = False) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [{_num(ci[0], pct)}, {_num(ci[1], pct)}]"


def tied_records(targets: list[dict]) -> list[str]:
    """``task s<seed>`` of every record whose ground truth has 2+ models, all at one test accuracy."""
    out = []
    for t in targets:
        accs = {v["test_accuracy"] for v in t["ground_truth"].values()}
        if len(t["ground_truth"]) > 1 and len(accs) == 1:
            out.append(f"{t['task']} s{t['seed']}")
    return out


def evaluation_markdown(ev: dict) -> str:
    """evaluation.md: the summary table first, then per-task regret, references and settings."""
    from tans.selection.metrics import wins_or_ties

    s, summary = ev["settings"], ev["summary"]
    n_records = len(ev["targets"])
    lines = [
        f"# Model-selection evaluation: {ev['run']}",
        "",
        f"{len({t['task'] for t in ev['targets']})} target(s) × seeds {s['seeds']} = {n_records} record(s); "
        f"space `{ev['space']['run']}` (zoo `{ev['space']['zoo']}`); constraint "
        f"{', '.join(f'{k} ≤ {v:,}' for k, v in s['constraints'].items() if v) or 'none'}; "
        f"ground truth: every pool model fine-tuned {s['recipe']['epochs']} epoch(s) at lr {s['recipe']['lr']:g} "
        f"(recipe `{s['recipe']['config']}`).",
        "",
        "Weighted Kendall τ between each method's scores and the ground-truth test accuracies (hyperbolic weights; "
        "1 = same order, 0 = unrelated), top-1 / top-3 regret in accuracy points (best pool model minus the method's "
        "best of its first 1 / 3 picks; lower is better), mean over targets × seeds with bootstrap 95 % intervals, "
        "and the method's selection time per record.",
        "",
        "| method | weighted τ | top-1 regret (pts) | top-3 regret (pts) | seconds | regret ≤ nearest_dataset | "
        "regret ≤ logme |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in [m for m in METHODS if m in summary]:
        m = summary[key]
        vs = []
        for other in ("nearest_dataset", "logme"):
            if other in summary and other != key:
                w, n = wins_or_ties(summary, key, other)
                vs.append(f"{w}/{n} tasks")
            else:
                vs.append("—")
        lines.append(f"| `{key}` | {_num(m['weighted_tau'])}{_ci(m['weighted_tau_ci95'])} | "
                     f"{_num(m['top1_regret'], True)}{_ci(m['top1_regret_ci95'], True)} | "
                     f"{_num(m['top3_regret'], True)}{_ci(m['top3_regret_ci95'], True)} | "
                     f"{_num(m['seconds'], digits=2)} | {vs[0]} | {vs[1]} |")
    tied = tied_records(ev["targets"])
    if tied:
        lines += ["", f"τ is undefined (—) for {len(tied)} record(s) where every pool model reached the same test "
                  f"accuracy, so there is no order to agree with: {', '.join(tied)}. They count in the regrets "
                  "(0 for every method) and not in τ; a harder split or a larger test set would separate the models."]
    tasks = list(dict.fromkeys(t["task"] for t in ev["targets"]))
    shown = [m for m in METHODS if m in summary]
    lines += ["", "## Top-1 regret per task (points, mean over seeds)", "",
              "| task | best in pool (%) | " + " | ".join(f"`{m}`" for m in shown) + " |",
              "|---|---|" + "---|" * len(shown)]
    for task in tasks:
        recs = [t for t in ev["targets"] if t["task"] == task]
        best = np.mean([max(v["test_accuracy"] for v in r["ground_truth"].values()) for r in recs if r["ground_truth"]])
        cells = [_num(summary[m]["per_task"].get(task, {}).get("top1_regret"), True) for m in shown]
        lines.append(f"| {task} | {100 * best:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "## References and pools (test accuracy %)", "",
              "| task | seed | pool (models / zoo tasks / archs) | best in pool | worst in pool | "
              + " | ".join(REFERENCES) + " |", "|---|---|---|---|---|" + "---|" * len(REFERENCES)]
    for t in ev["targets"]:
        accs = [v["test_accuracy"] for v in t["ground_truth"].values()]
        p = t["pool_stats"]
        refs = [_num((t["references"].get(r) or {}).get("test_accuracy"), True) for r in REFERENCES]
        lines.append(f"| {t['task']} | {t['seed']} | {p['models']} / {p['zoo_tasks']} / {p['architectures']} | "
                     f"{_num(max(accs) if accs else None, True)} | {_num(min(accs) if accs else None, True)} | "
                     + " | ".join(refs) + " |")
    failed = [f"{t['task']} s{t['seed']}: {f['model_id']} ({f['error'][:80]})" for t in ev["targets"]
              for f in t.get("failed", [])]
    if failed:
        lines += ["", "## Failed fine-tunes (left out of the ground truth)", ""] + [f"- {f}" for f in failed]
    lines += ["", "Raw numbers (pools, ground truth, every score): `evaluation.json` next to this file.", ""]
    return "\n".join(lines)


def plot_evaluation(ev: dict, path: str) -> None:
    """evaluation.png: weighted τ and top-1 regret per method with 95 % intervals, and regret per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = ev["summary"]
    keys = [m for m in METHODS if m in summary]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, title, scale in ((axes[0], "weighted_tau", "weighted Kendall τ (higher is better)", 1.0),
                                     (axes[1], "top1_regret", "top-1 regret, points (lower is better)", 100.0)):
        vals = [summary[k][metric] for k in keys]
        mids = np.array([np.nan if v is None else scale * v for v in vals])
        lo = np.array([np.nan if summary[k][metric + "_ci95"][0] is None else scale * summary[k][metric + "_ci95"][0]
                       for k in keys])
        hi = np.array([np.nan if summary[k][metric + "_ci95"][1] is None else scale * summary[k][metric + "_ci95"][1]
                       for k in keys])
        colors = ["tab:red" if k.startswith("tans") else "tab:gray" for k in keys]
        ax.bar(range(len(keys)), np.nan_to_num(mids), color=colors,
               yerr=np.nan_to_num(np.vstack([mids - lo, hi - mids])), capsize=3)
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", lw=0.6)
    tasks = list(dict.fromkeys(t["task"] for t in ev["targets"]))
    grid = np.array([[np.nan if summary[k]["per_task"].get(t, {}).get("top1_regret") is None
                      else 100 * summary[k]["per_task"][t]["top1_regret"] for k in keys] for t in tasks])
    im = axes[2].imshow(grid, aspect="auto", cmap="viridis_r")
    axes[2].set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    axes[2].set_yticks(range(len(tasks)), tasks, fontsize=8)
    axes[2].set_title("top-1 regret per task (points)", fontsize=10)
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
