"""Replay ``tans_search`` variants on finished ``tans evaluate`` records, without fine-tuning.

    python bench/search_variants.py ROOT RUN [RUN ...] [--nearest-margins 1,2,3] [--val-loss] [--ensemble]

Every record of a run (``ROOT/evaluations/RUN/targets/*.json``) holds each pool model's
validation and test accuracy after the search recipe's fine-tune (``ground_truth``) and every
selector's scores. ``tans_search`` fine-tunes 4 candidates and keeps the best on validation, so
any rule for choosing the 4 can be judged from the record alone: its pick is the candidate with
the highest validation accuracy (ties: the earlier candidate), its top-1 regret the best test
accuracy in the pool minus the pick's. Variants:

* ``similarity_top4``: the 4 models the space's similarity ranks first (today's ``tans search``
  with ``top_k: 4``, ``finetune: 4``; ``recorded`` is its pick as the run recorded it);
* ``predicted_top4``: the 4 the space's performance predictor ranks first;
* ``with_nearest``: the similarity's first 3, and ``nearest_dataset``'s pick as the 4th;
* ``random3_nearest``: the ablation of the space: 3 *random* pool models and ``nearest_dataset``'s
  pick, the expected regret over every such triple (exact, not sampled). What ``with_nearest``
  and ``recorded`` gain over it is what the space's ranking adds to fine-tuning 4 models and choosing on
  validation;
* ``nearest_within_<m>`` (with ``--nearest-margins m,...``): the models the run's search fine-tuned
  (``tans_search.finetuned``), but ``nearest_dataset``'s pick is kept unless another of them is
  ahead of it on validation by more than ``m`` points: a prior for the obvious neighbour against
  the noise of a small validation split;
* ``by_val_accuracy`` and ``by_val_loss`` (with ``--val-loss``): the models the run's search
  fine-tuned, chosen by the highest validation accuracy or by the lowest validation loss (ties:
  the earlier candidate), the two rules of ``select_by`` in the search recipe. Needs records
  whose ground truth holds ``val_loss`` (``tans evaluate`` writes it since that key exists).

Printed per record and as means (per run, then over the records of all RUNs together), with
``nearest_dataset`` and ``logme`` for reference, and per variant the number of tasks (mean over a
task's records) where its regret is at most ``nearest_dataset``'s. Use it on meta_val runs to
choose; meta_test runs only to report.

``--ensemble`` judges an ensemble of the spaces behind the RUNs instead (e.g. one run per
``train-space`` seed, same targets and seeds): its similarity is the sum over the runs of each
run's similarity z-scored over the pool, and it fine-tunes that sum's top 4. The records of the
runs must match (same stems, same pools, same ground truth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def regret(record: dict, model_id: str) -> float:
    truth = record["ground_truth"]
    return 100 * (max(v["test_accuracy"] for v in truth.values()) - truth[model_id]["test_accuracy"])


def pick_on_validation(record: dict, candidates: list[str]) -> str:
    truth = record["ground_truth"]
    return max(candidates, key=lambda m: (truth[m]["val_accuracy"], -candidates.index(m)))


def top(scores: dict[str, float], k: int, pool: list[str]) -> list[str]:
    return sorted(pool, key=lambda m: -scores.get(m, float("-inf")))[:k]


def random_with_nearest(record: dict, nearest: str, k: int = 3) -> float:
    """Mean regret of choosing on validation among ``k`` random pool models plus ``nearest``,
    over every ``k``-subset of the rest of the pool (each subset in pool order, ``nearest`` last)."""
    rest = [m for m in record["pool"] if m != nearest]
    subsets = itertools.combinations(rest, min(k, len(rest)))
    return statistics.mean(regret(record, pick_on_validation(record, [*s, nearest])) for s in subsets)


def nearest_within(record: dict, margin_pts: float) -> str:
    """Of the fine-tunes the run's search made, ``nearest_dataset``'s pick unless another is better
    on validation by more than ``margin_pts`` points (then the best on validation, ties: earlier)."""
    finetuned = record["methods"]["tans_search"].get("finetuned")
    if not finetuned:
        raise SystemExit(f"search_variants: record {record['task']}-s{record.get('seed')} has no "
                         "tans_search.finetuned list (written by tans evaluate since the nearest-candidate rule)")
    truth, nearest = record["ground_truth"], record["methods"]["nearest_dataset"]["pick"]
    best = pick_on_validation(record, finetuned)
    if nearest in finetuned and truth[best]["val_accuracy"] - truth[nearest]["val_accuracy"] <= margin_pts / 100 + 1e-9:
        return nearest
    return best


def pick_by_val_loss(record: dict, candidates: list[str]) -> str:
    """The candidate with the lowest validation loss (ties: the earlier one)."""
    truth = record["ground_truth"]
    missing = [m for m in candidates if truth[m].get("val_loss") is None]
    if missing:
        raise SystemExit(f"search_variants: record {record['task']}-s{record.get('seed')} has no validation loss "
                         f"for {missing[0]} (records written before tans evaluate kept val_loss)")
    return min(candidates, key=lambda m: (truth[m]["val_loss"], candidates.index(m)))


def rule_variants(record: dict) -> dict[str, float]:
    """The run's fine-tuned candidates chosen by validation accuracy, and by validation loss."""
    finetuned = record["methods"]["tans_search"].get("finetuned")
    if not finetuned:
        raise SystemExit(f"search_variants: record {record['task']}-s{record.get('seed')} has no "
                         "tans_search.finetuned list")
    return {"by_val_accuracy": regret(record, pick_on_validation(record, finetuned)),
            "by_val_loss": regret(record, pick_by_val_loss(record, finetuned))}


def variants(record: dict, margins: tuple[float, ...] = (), val_loss: bool = False) -> dict[str, float]:
    methods, pool = record["methods"], record["pool"]
    by_similarity = top(methods["tans_similarity"]["scores"], 4, pool)
    nearest = methods["nearest_dataset"]["pick"]
    with_nearest = by_similarity[:3] + ([nearest] if nearest not in by_similarity[:3] else by_similarity[3:4])
    return {
        "recorded": regret(record, methods["tans_search"]["pick"]),
        "similarity_top4": regret(record, pick_on_validation(record, by_similarity)),
        "predicted_top4": regret(record, pick_on_validation(record, top(methods["tans_predicted"]["scores"], 4, pool))),
        "with_nearest": regret(record, pick_on_validation(record, with_nearest)),
        "random3_nearest": random_with_nearest(record, nearest),
        **{f"nearest_within_{m:g}": regret(record, nearest_within(record, m)) for m in margins},
        **(rule_variants(record) if val_loss else {}),
        "nearest_dataset": regret(record, nearest),
        "logme": regret(record, methods["logme"]["pick"]),
    }


def zscores(scores: dict[str, float], pool: list[str]) -> dict[str, float]:
    values = [scores[m] for m in pool]
    mean, sd = statistics.mean(values), statistics.pstdev(values) or 1.0
    return {m: (scores[m] - mean) / sd for m in pool}


def ensemble_variants(records: list[dict]) -> dict[str, float]:
    """One target scored by several spaces: each space's similarity top 4, and the ensemble's."""
    first, pool = records[0], records[0]["pool"]
    for other in records[1:]:
        if other["pool"] != pool or other["ground_truth"] != first["ground_truth"]:
            raise SystemExit("search_variants --ensemble: the runs' records differ in pool or ground truth "
                             "(they must evaluate the same targets with the same seeds)")
    sims = [r["methods"]["tans_similarity"]["scores"] for r in records]
    z = [zscores(s, pool) for s in sims]
    summed = {m: sum(zi[m] for zi in z) for m in pool}
    out = {f"similarity_top4_{i}": regret(first, pick_on_validation(first, top(s, 4, pool)))
           for i, s in enumerate(sims)}
    out["ensemble_top4"] = regret(first, pick_on_validation(first, top(summed, 4, pool)))
    out["nearest_dataset"] = regret(first, first["methods"]["nearest_dataset"]["pick"])
    return out


def records_of(root: str, run: str) -> dict[str, dict]:
    files = sorted((Path(root) / "evaluations" / run / "targets").glob("*.json"))
    if not files:
        raise SystemExit(f"search_variants: no records under {Path(root) / 'evaluations' / run / 'targets'}")
    return {f.stem: json.loads(f.read_text()) for f in files}


def print_table(title: str, rows: dict[str, dict[str, float]], tasks: dict[str, str]) -> None:
    """Per-record regrets, their means, and per variant the tasks at or below nearest_dataset."""
    names = list(next(iter(rows.values())))
    print(f"\n{title}: top-1 regret (points)")
    print(f"{'record':22s}" + "".join(f"{n:>19s}" for n in names))
    for stem, row in rows.items():
        print(f"{stem:22s}" + "".join(f"{row[n]:19.1f}" for n in names))
    print(f"{'mean':22s}" + "".join(f"{statistics.mean(r[n] for r in rows.values()):19.2f}" for n in names))

    def task_mean(name: str, task: str) -> float:
        return statistics.mean(rows[s][name] for s in rows if tasks[s] == task)

    all_tasks = sorted(set(tasks.values()))
    at_most = {n: sum(task_mean(n, t) <= task_mean("nearest_dataset", t) + 1e-9 for t in all_tasks) for n in names}
    print(f"{'tasks <= nearest':22s}" + "".join(f"{f'{at_most[n]}/{len(all_tasks)}':>19s}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--ensemble", action="store_true", help="judge the RUNs' spaces as one ensemble")
    ap.add_argument("--nearest-margins", default="", metavar="M,...",
                    help="also judge keeping nearest_dataset's pick unless beaten on validation by > M points")
    ap.add_argument("--val-loss", action="store_true",
                    help="also judge choosing the search's fine-tunes by validation loss instead of accuracy")
    args = ap.parse_args()
    try:
        margins = tuple(float(m) for m in args.nearest_margins.split(",") if m.strip())
    except ValueError:
        raise SystemExit(f"search_variants: --nearest-margins must be comma-separated numbers, "
                         f"got {args.nearest_margins!r}") from None
    runs = {run: records_of(args.root, run) for run in args.runs}
    if args.ensemble:
        stems = sorted(set.intersection(*(set(r) for r in runs.values())))
        if not stems:
            raise SystemExit("search_variants --ensemble: the runs share no record")
        rows = {s: ensemble_variants([runs[run][s] for run in args.runs]) for s in stems}
        tasks = {s: runs[args.runs[0]][s]["task"] for s in stems}
        print_table(f"ensemble of {', '.join(args.runs)} ({len(stems)} records)", rows, tasks)
        return
    pooled_rows, pooled_tasks = {}, {}
    for run, records in runs.items():
        rows = {s: variants(r, margins, args.val_loss) for s, r in records.items()}
        print_table(run, rows, {s: r["task"] for s, r in records.items()})
        pooled_rows.update({f"{run}/{s}": row for s, row in rows.items()})
        pooled_tasks.update({f"{run}/{s}": r["task"] for s, r in records.items()})
    if len(runs) > 1:  # every record of every run, each weighing the same
        print_table(f"all {len(runs)} runs ({len(pooled_rows)} records)", pooled_rows, pooled_tasks)


if __name__ == "__main__":
    main()
