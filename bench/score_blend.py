"""Judge a blend of the space's score with the nearest-dataset score, on finished ``tans evaluate`` records.

    python bench/score_blend.py ROOT RUN [RUN ...] [--alphas 0,0.5,1,2,4]

The learned space ranks pool models by ``tans_similarity`` (or ``tans_predicted``, or the two
z-scores summed: ``similarity+predicted``); the
``nearest_dataset`` selector ranks them by how close each model's zoo task is to the target in
the frozen extractor's features. This replays, without fine-tuning, the blend

    blend = z(space score) + alpha * z(nearest_dataset score)      (z: standardised over the pool)

for every ``alpha``: ``alpha = 0`` is the space alone, a large ``alpha`` the nearest dataset with the
space breaking its ties. Per alpha and space score it prints the mean weighted Kendall tau against
the ground truth (as ``tans evaluate`` computes it), the top-1 regret of the blend's first model,
and the regret of the search built on it (its first 3 plus ``nearest_dataset``'s pick, chosen on
validation, as ``tans search`` chooses). Use it on validation runs to choose; on meta_test only
to report.

For scale it also prints ``nearest_dataset`` and ``logme``, and ``fine-tune val``: the pool ranked
by each model's own validation accuracy after the ground-truth fine-tune (what fine-tuning the
whole pool and choosing on validation would give). That is about the best any selector can do
against ground truth measured once on a few hundred test images: its tau is below 1 only
because both accuracies are noisy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

# the record helpers the search replay already has: regret, z-scores, choice on validation, loading
from search_variants import pick_on_validation, records_of, regret, zscores  # noqa: E402

from tans.selection.metrics import weighted_tau  # noqa: E402
from tans.selection.search import finetune_list  # noqa: E402

# the last one is not a recorded selector: the two space scores' z-scores summed (and standardised
# again, so alpha weighs the prior against it as against either score alone)
BOTH = "similarity+predicted"
SPACE_SCORES = ("tans_similarity", "tans_predicted", BOTH)


def space_score(record: dict, space_key: str, pool: list[str]) -> dict[str, float]:
    """z-scores over ``pool`` of a space score (``BOTH``: of the sum of the two recorded ones)."""
    if space_key != BOTH:
        return zscores(record["methods"][space_key]["scores"], pool)
    sim, pred = (zscores(record["methods"][k]["scores"], pool) for k in ("tans_similarity", "tans_predicted"))
    return zscores({m: sim[m] + pred[m] for m in pool}, pool)


def blend(record: dict, space_key: str, alpha: float) -> dict[str, float]:
    """The blended score of every pool model whose ground-truth fine-tune finished."""
    pool = [m for m in record["pool"] if m in record["ground_truth"]]
    space = space_score(record, space_key, pool)
    near = zscores(record["methods"]["nearest_dataset"]["scores"], pool)
    return {m: space[m] + alpha * near[m] for m in pool}


def ranked(scores: dict[str, float]) -> list[str]:
    # stable: equal scores keep pool order, as tans.selection.metrics.ranked_ids does
    return sorted(scores, key=lambda m: -scores[m])


def search_pick(record: dict, order: list[str], n: int = 4) -> str:
    """What ``tans search`` keeps: of its ``n`` fine-tunes, the best on validation (ties: earlier)."""
    return pick_on_validation(record, finetune_list(order, record["methods"]["nearest_dataset"]["pick"], n))


def judge(record: dict, space_key: str, alpha: float) -> dict[str, float]:
    scores = blend(record, space_key, alpha)
    order = ranked(scores)
    truth = {m: v["test_accuracy"] for m, v in record["ground_truth"].items()}
    return {"tau": weighted_tau(scores, truth), "top1": regret(record, order[0]),
            "search": regret(record, search_pick(record, order))}


def table(records: list[dict], alphas: list[float]) -> list[dict]:
    """One row per (space score, alpha): mean tau, mean top-1 regret, mean search regret."""
    rows = []
    for key in SPACE_SCORES:
        for alpha in alphas:
            judged = [judge(r, key, alpha) for r in records]
            taus = [j["tau"] for j in judged if not math.isnan(j["tau"])]
            rows.append({"score": key, "alpha": alpha, "tau": statistics.mean(taus) if taus else math.nan,
                         "top1": statistics.mean(j["top1"] for j in judged),
                         "search": statistics.mean(j["search"] for j in judged)})
    return rows


FINETUNE_VAL = "fine-tune val"


def reference(records: list[dict], method: str) -> tuple[float, float]:
    """(mean tau, mean top-1 regret) of a recorded selector, or of ``FINETUNE_VAL`` (the ground-truth
    fine-tunes' own validation accuracies), for comparison."""
    taus, regrets = [], []
    for r in records:
        truth = {m: v["test_accuracy"] for m, v in r["ground_truth"].items()}
        if method == FINETUNE_VAL:
            scores = {m: v["val_accuracy"] for m, v in r["ground_truth"].items()}
            pick = pick_on_validation(r, [m for m in r["pool"] if m in r["ground_truth"]])
        else:
            scores, pick = r["methods"][method]["scores"], r["methods"][method]["pick"]
        tau = weighted_tau(scores, truth)
        if not math.isnan(tau):
            taus.append(tau)
        regrets.append(regret(r, pick))
    return statistics.mean(taus), statistics.mean(regrets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--alphas", default="0,0.25,0.5,1,2,4", help="comma-separated blend weights")
    args = ap.parse_args()
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise SystemExit(f"score_blend: --alphas must be comma-separated numbers, got {args.alphas!r}") from None
    records = [r for run in args.runs for r in records_of(args.root, run).values()]
    print(f"{len(records)} records from {', '.join(args.runs)}")
    print(f"{'score':22s}{'alpha':>7s}{'tau':>9s}{'top-1':>8s}{'search':>8s}")
    for row in table(records, alphas):
        print(f"{row['score']:22s}{row['alpha']:7.2f}{row['tau']:9.3f}{row['top1']:8.2f}{row['search']:8.2f}")
    for method in ("nearest_dataset", "logme", FINETUNE_VAL):
        tau, top1 = reference(records, method)
        print(f"{method:22s}{'':7s}{tau:9.3f}{top1:8.2f}")


if __name__ == "__main__":
    main()
