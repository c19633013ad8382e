"""`tans demo` (tiny profile): every stage, the table, and a second run that reuses everything."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.timeout(2400)
def test_tiny_demo_prints_the_table_and_reuses_on_a_second_run(tiny_space):
    # the session's tiny root already holds the tasks, zoo and space: the demo reuses them and
    # runs the search stage (the zoo and space stages have their own tests)
    root, _ = tiny_space
    proc = run_cli("demo", "--config", "configs/demo/tiny.yaml", "--root", str(root), timeout=2000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[data] done: 5 tasks" in proc.stdout
    assert "reusing the finished space" in proc.stdout
    header = ("| dataset | TANS pick | scratch | scratch (matched compute) | generic | random | nearest | LogME "
              "| oracle | search time |")
    assert header in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| clipart_0_9 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 10 and all(c != "—" for c in cells[1:9]), row
    assert 0.0 <= float(cells[1].split("±")[0]) <= 100.0
    table = json.loads((root / "demo" / "table.json").read_text())
    assert [r["dataset"] for r in table] == ["clipart_0_9"]
    report = json.loads((root / "searches" / "demo-clipart_0_9" / "report.json").read_text())
    assert abs(100 * report["winner_result"]["test_accuracy"] - float(cells[1].split("±")[0])) < 0.051
    saved = json.loads((root / "demo" / "config.json").read_text())
    assert saved["zoo"] == "configs/zoo/tiny.yaml" and saved["root"] == str(root)

    again = run_cli("demo", "--config", "configs/demo/tiny.yaml", "--root", str(root), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the finished search" in again.stdout and row in again.stdout
    # the table says where the comparison with intervals over seeds is
    pointer = f"tans evaluate --config configs/evaluate/tiny.yaml --root {root}"
    assert pointer in again.stdout and pointer in (root / "demo" / "table.md").read_text()
