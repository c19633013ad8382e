"""Python 3.12 smoke check: the project supports 3.11 and 3.12 (GPU images ship 3.12).

The full suite runs on 3.11 (the lock's interpreter). Where a 3.12 interpreter exists, this compiles
every module with warnings as errors (3.12 turned invalid escape sequences into SyntaxWarnings) and,
in a scratch 3.12 environment holding only PyYAML and NumPy, runs `tans --help` and loads every shipped config
profile: the CLI's and the config system's import paths stay clean of 3.11-only code.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python312() -> str | None:
    candidates = [os.environ.get("TANS_PYTHON312", ""), "python3.12",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return exe
    return None


PY312 = _python312()
pytestmark = pytest.mark.skipif(PY312 is None, reason="no Python 3.12 interpreter on this machine")


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env={**env, **kw.pop("env", {})}, **kw)


@pytest.mark.timeout(300)
def test_every_module_compiles_on_312_without_warnings(tmp_path):
    proc = _run([PY312, "-W", "error", "-m", "compileall", "-q", "-f", "-d", "src", "tans", "jobs", "serve", "bench"],
                cwd=REPO, env={"PYTHONPYCACHEPREFIX": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.timeout(300)
def test_cli_and_configs_on_312(tmp_path):
    venv = tmp_path / "py312"
    assert _run([PY312, "-m", "venv", str(venv)]).returncode == 0
    py = str(venv / "bin" / "python")
    pip = _run([py, "-m", "pip", "install", "-q", "pyyaml>=6", "numpy>=1.26"])
    assert pip.returncode == 0, "installing PyYAML and NumPy into a 3.12 venv failed: " + pip.stderr[-1000:]
    env = {"PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    help_ = _run([py, "-m", "jobs.cli", "--help"], cwd=tmp_path, env=env)
    assert help_.returncode == 0, help_.stderr[-2000:]
    assert "build-zoo" in help_.stdout and "search" in help_.stdout
    # every profile of every stage parses and validates against its dataclass on 3.12
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tans.job_configs import CONFIG_DIR, JOB_CONFIGS, load_job_config\n"
        "n = 0\n"
        "for stage in sorted(JOB_CONFIGS):\n"
        "    for path in sorted((Path(CONFIG_DIR) / stage).glob('*.yaml')):\n"
        "        load_job_config(stage, path.stem); n += 1\n"
        "print(sys.version_info[:2], n)\n"
    )
    proc = _run([py, "-c", script], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, count = proc.stdout.strip().split(")")
    assert version == "(3, 12" and int(count) >= 10, proc.stdout
