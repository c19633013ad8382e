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
        "pool": pool,
        "ground_truth": {m: {"val_accuracy": v, "test_accuracy": t} for m, (v, t) in acc.items()},
        "methods": {
            "tans_similarity": {"scores": {m: -i for i, m in enumerate(pool)}},
            "tans_predicted": {"scores": {m: i for i, m in enumerate(pool)}},
            "tans_search": {"pick": "b"},
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
    assert out["nearest_dataset"] == pytest.approx(10.0) and out["logme"] == pytest.approx(25.0)


def test_cli_prints_means_and_rejects_an_empty_run(tmp_path):
    targets = tmp_path / "evaluations" / "r" / "targets"
    targets.mkdir(parents=True)
    (targets / "t-s0.json").write_text(json.dumps(_record()))
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "r"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    mean = [line for line in ok.stdout.splitlines() if line.startswith("mean")][0].split()[1:]
    assert [float(x) for x in mean] == [20.0, 20.0, 0.0, 20.0, 10.0, 25.0]
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "missing"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no records under" in bad.stderr
