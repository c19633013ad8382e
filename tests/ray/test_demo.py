"""`tans demo` (tiny profile) runs its stages end to end and says which ones it ran."""

from __future__ import annotations

import json

import pytest

from tans.storage import Storage
from tans.zoo import read_zoo
from tests.conftest import run_cli


@pytest.mark.timeout(900)
def test_tiny_demo_runs_data_zoo_and_space(tmp_path):
    root = tmp_path / "root"
    proc = run_cli("demo", "--config", "configs/demo/tiny.yaml", "--root", str(root), timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[data] done: 5 tasks" in proc.stdout
    assert "ran the data, zoo and space stages" in proc.stdout and "search" in proc.stdout
    assert (root / "spaces" / "LATEST").read_text().strip() == "tiny"
    table = read_zoo(Storage(str(root)), "tiny-ofa_mbv3_tiny-32px")
    assert table.num_rows == 16
    saved = json.loads((root / "demo" / "config.json").read_text())
    assert saved["zoo"] == "configs/zoo/tiny.yaml" and saved["root"] == str(root)
