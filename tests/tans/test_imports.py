"""The library stays free of Ray: `import tans` (and its core modules) never imports `ray`."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE_MODULES = [
    "tans",
    "tans.config",
    "tans.storage",
    "tans.data.tasks",
    "tans.data.ingest",
    "tans.data.reader",
    "tans.job_configs",
    "tans.data.builtin.catalog",
    "jobs.cli",  # the `tans` command: its import stays light too
    "tans.zoo.supernets",
    "tans.zoo.subnets",
    "tans.zoo.measure",
    "tans.zoo.model_ops",
    "tans.selection.onnx_export",
    "tans.zoo.elastic",
    "tans.zoo.store",
    "tans.space.encoders",
    "tans.space.contrastive",
    "tans.space.retrieval",
    "tans.space.metrics",
    "tans.space.features",
    "tans.space.training",
    "tans.space.store",
    "tans.selection.finetune",
    "tans.selection.export",
    "tans.selection.logme",
    "tans.selection.evaluation",
    "tans.selection.metrics",
    "tans.selection.transferability",
    "tans.names",
    "tans.lease",
    "tans.data.image_limits",
]


@pytest.mark.timeout(120)
def test_core_does_not_import_ray():
    code = "import sys\n" + "".join(f"import {m}\n" for m in CORE_MODULES) + "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(60)
def test_cli_help_and_unknown_commands():
    from tests.conftest import run_cli

    ok = run_cli("--help")
    assert ok.returncode == 0 and "data" in ok.stdout and "demo" in ok.stdout and "serve" in ok.stdout
    assert "export" in ok.stdout
    unknown = run_cli("frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_the_old_search_facade_names_its_new_home():
    import tans

    with pytest.raises(AttributeError, match=r"from jobs\.api import search"):
        tans.search  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tans.nope  # noqa: B018
