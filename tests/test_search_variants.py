"""bench/search_variants.py: the replayed picks and regrets, on a hand-made evaluation record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "search_variants.py"


def _module():
    spec = importlib.util.spec_from_file_location("search_variants", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record() -> dict:
    # model: (val, test). Similarity ranks a > b > c > d > e > f; the predictor f > e > d > c > ...
    acc = {"a": (0.5, 0.50), "b": (0.7, 0.60), "c": (0.7, 0.65), "d": (0.4, 0.55), "e": (0.6, 0.70), "f": (0.9, 0.80)}
    pool = list(acc)
    return {
        "task": "t",
        "pool": pool,
        "ground_truth": {m: {"val_accuracy": v, "test_accuracy": t} for m, (v, t) in acc.items()},
        "methods": {
            "tans_similarity": {"scores": {m: -i for i, m in enumerate(pool)}},
            "tans_predicted": {"scores": {m: i for i, m in enumerate(pool)}},
            "tans_search": {"pick": "b", "finetuned": ["a", "b", "c", "e"]},
            "nearest_dataset": {"pick": "e"},
            "logme": {"pick": "d"},
        },
    }


def test_variants_pick_on_validation_among_their_candidates():
    out = _module().variants(_record())
    best = 0.80
    assert out["recorded"] == pytest.approx(100 * (best - 0.60))
    # similarity's top 4 = a, b, c, d: b and c tie on validation, the earlier one (b) wins
    assert out["similarity_top4"] == pytest.approx(100 * (best - 0.60))
    # predictor's top 4 = f, e, d, c: f has the best validation accuracy
    assert out["predicted_top4"] == pytest.approx(0.0)
    # a, b, c and nearest_dataset's e: b (0.7) beats e (0.6) on validation
    assert out["with_nearest"] == pytest.approx(100 * (best - 0.60))
    # 3 of a, b, c, d, f with e: the 6 triples holding f pick it (0); of the other 4, (a, b, c),
    # (a, b, d) and (b, c, d) pick b (20: b ties c and comes first) and (a, c, d) picks c (15)
    assert out["random3_nearest"] == pytest.approx((20 + 20 + 20 + 15) / 10)
    assert out["nearest_dataset"] == pytest.approx(10.0) and out["logme"] == pytest.approx(25.0)


def test_nearest_within_keeps_the_neighbour_unless_beaten_by_more_than_the_margin():
    mod = _module()
    record = _record()
    # fine-tuned a, b, c, e: b and c lead on validation (0.7, b first), nearest_dataset's e has 0.6
    assert mod.nearest_within(record, 0) == "b" and mod.nearest_within(record, 9.9) == "b"
    assert mod.nearest_within(record, 10) == "e"  # 10 points ahead is not more than 10
    out = mod.variants(record, (0, 10))
    assert out["nearest_within_0"] == pytest.approx(20.0) and out["nearest_within_10"] == pytest.approx(10.0)
    # a nearest pick the search did not fine-tune cannot be kept
    record["methods"]["nearest_dataset"]["pick"] = "f"
    assert mod.nearest_within(record, 50) == "b"
    del record["methods"]["tans_search"]["finetuned"]
    with pytest.raises(SystemExit, match="no tans_search.finetuned"):
        mod.nearest_within(record, 1)


def test_the_fine_tunes_chosen_by_validation_loss():
    mod = _module()
    record = _record()
    losses = {"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.1, "e": 0.5, "f": 0.2}
    for m, loss in losses.items():
        record["ground_truth"][m]["val_loss"] = loss
    # fine-tuned a, b, c, e: by accuracy b (0.7, before c); by loss c and e tie at 0.5, c first
    assert mod.rule_variants(record) == pytest.approx({"by_val_accuracy": 20.0, "by_val_loss": 15.0})
    assert mod.variants(record, val_loss=True)["by_val_loss"] == pytest.approx(15.0)
    assert "by_val_loss" not in mod.variants(record)
    del record["ground_truth"]["e"]["val_loss"]
    with pytest.raises(SystemExit, match="no validation loss for e"):
        mod.rule_variants(record)


def test_cli_prints_means_and_rejects_an_empty_run(tmp_path):
    targets = tmp_path / "evaluations" / "r" / "targets"
    targets.mkdir(parents=True)
    (targets / "t-s0.json").write_text(json.dumps(_record()))
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    mean = [line for line in ok.stdout.splitlines() if line.startswith("mean")][0].split()[1:]
    assert [float(x) for x in mean] == [20.0, 20.0, 0.0, 20.0, 7.5, 10.0, 25.0]
    margins = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r", "--nearest-margins", "10"],
                             capture_output=True, text=True)
    assert margins.returncode == 0, margins.stderr
    header = margins.stdout.splitlines()[2].split()
    margin_mean = [line for line in margins.stdout.splitlines() if line.startswith("mean")][0].split()[1:]
    assert float(margin_mean[header.index("nearest_within_10") - 1]) == 10.0
    # two runs: a third table over both runs' records together
    (tmp_path / "evaluations" / "r2" / "targets").mkdir(parents=True)
    (tmp_path / "evaluations" / "r2" / "targets" / "u-s0.json").write_text(json.dumps({**_record(), "task": "u"}))
    both = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r", "r2"], capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    pooled = both.stdout.split("all 2 runs (2 records)")[1].splitlines()
    assert [line.split()[0] for line in pooled[2:4]] == ["r/t-s0", "r2/u-s0"]
    assert [float(x) for x in next(x for x in pooled if x.startswith("mean")).split()[1:]] == [float(x) for x in mean]
    assert next(x for x in pooled if x.startswith("tasks")).split()[3] == "0/2"
    wrong = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r", "--nearest-margins", "x"],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "--nearest-margins must be" in wrong.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "missing"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no records under" in bad.stderr
    # the one task's regret (20) is above nearest_dataset's (10) for similarity, below for the predictor
    tasks = [line for line in ok.stdout.splitlines() if line.startswith("tasks <= nearest")][0].split()[3:]
    assert tasks == ["0/1", "0/1", "1/1", "0/1", "1/1", "1/1", "0/1"]


def _rescored(record: dict, order: list[str]) -> dict:
    """``record`` with a similarity that ranks the pool in ``order``."""
    out = json.loads(json.dumps(record))
    out["methods"]["tans_similarity"]["scores"] = {m: float(-i) for i, m in enumerate(order)}
    return out


def test_ensemble_sums_z_scored_similarities_and_picks_on_validation():
    mod = _module()
    one, two, three = (_rescored(_record(), list(order)) for order in ("abcdef", "fedcba", "efabcd"))
    out = mod.ensemble_variants([one, two, three])
    assert out["similarity_top4_0"] == pytest.approx(20.0)  # a b c d: b and c tie on val, b first
    assert out["similarity_top4_1"] == pytest.approx(0.0)  # f e d c: f
    assert out["similarity_top4_2"] == pytest.approx(0.0)  # e f a b: f
    # Each space's scores z-score to (2.5 - rank) / sd over the pool, sd alike for all three, so
    # the sum ranks by 7.5 - (sum of ranks): e 0+1+4 -> 2.5, f 5+0+1 -> 1.5, a 0+5+2 -> 0.5,
    # b 1+4+3 -> -0.5, c -1.5, d -2.5. Top 4: e f a b, and f wins on validation.
    assert out["ensemble_top4"] == pytest.approx(0.0) and out["nearest_dataset"] == pytest.approx(10.0)
    # with the first two spaces alone every sum is 0: the pool's order a b c d -> b, regret 20
    assert mod.ensemble_variants([one, two])["ensemble_top4"] == pytest.approx(20.0)
    with pytest.raises(SystemExit, match="differ in pool"):
        mod.ensemble_variants([one, {**two, "pool": list("abcde")}])


def test_cli_ensemble_needs_shared_records(tmp_path):
    for run, order in (("r0", "abcdef"), ("r1", "fedcba")):
        targets = tmp_path / "evaluations" / run / "targets"
        targets.mkdir(parents=True)
        (targets / f"{run}-only-s0.json").write_text(json.dumps(_rescored(_record(), list(order))))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r0", "r1", "--ensemble"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "share no record" in out.stderr
