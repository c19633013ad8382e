"""Replay ``tans_search`` variants on finished ``tans evaluate`` records, without fine-tuning.

    python bench/search_variants.py ROOT RUN [RUN ...]

Every record of a run (``ROOT/evaluations/RUN/targets/*.json``) holds each pool model's
validation and test accuracy after the search recipe's fine-tune (``ground_truth``) and every
selector's scores. ``tans_search`` fine-tunes 4 candidates and keeps the best on validation, so
any rule for choosing the 4 can be judged from the record alone: its pick is the candidate with
the highest validation accuracy (ties: the earlier candidate), its top-1 regret the best test
accuracy in the pool minus the pick's. Variants:

* ``similarity_top4``: the 4 models the space's similarity ranks first (today's ``tans search``
  with ``top_k: 4``, ``finetune: 4``; ``recorded`` is its pick as the run recorded it);
* ``predicted_top4``: the 4 the space's performance predictor ranks first;
* ``with_nearest``: the similarity's first 3, and ``nearest_dataset``'s pick as the 4th.

Printed per record and as means, with ``nearest_dataset`` and ``logme`` for reference. Use it on
meta_val runs to choose; meta_test runs only to report.
"""

from __future__ import annotations

import argparse
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


def variants(record: dict) -> dict[str, float]:
    methods, pool = record["methods"], record["pool"]
    by_similarity = top(methods["tans_similarity"]["scores"], 4, pool)
    nearest = methods["nearest_dataset"]["pick"]
    with_nearest = by_similarity[:3] + ([nearest] if nearest not in by_similarity[:3] else by_similarity[3:4])
    return {
        "recorded": regret(record, methods["tans_search"]["pick"]),
        "similarity_top4": regret(record, pick_on_validation(record, by_similarity)),
        "predicted_top4": regret(record, pick_on_validation(record, top(methods["tans_predicted"]["scores"], 4, pool))),
        "with_nearest": regret(record, pick_on_validation(record, with_nearest)),
        "nearest_dataset": regret(record, nearest),
        "logme": regret(record, methods["logme"]["pick"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    for run in args.runs:
        files = sorted((Path(args.root) / "evaluations" / run / "targets").glob("*.json"))
        if not files:
            raise SystemExit(f"search_variants: no records under {Path(args.root) / 'evaluations' / run / 'targets'}")
        rows = {f.stem: variants(json.loads(f.read_text())) for f in files}
        names = list(next(iter(rows.values())))
        print(f"\n{run}: top-1 regret (points)")
        print(f"{'record':22s}" + "".join(f"{n:>17s}" for n in names))
        for stem, row in rows.items():
            print(f"{stem:22s}" + "".join(f"{row[n]:17.1f}" for n in names))
        print(f"{'mean':22s}" + "".join(f"{statistics.mean(r[n] for r in rows.values()):17.2f}" for n in names))


if __name__ == "__main__":
    main()
