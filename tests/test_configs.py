"""Every shipped YAML in configs/ loads into its job's dataclass and documents its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tans.job_configs import CONFIG_DIR, JOB_CONFIGS, load_job_config

YAMLS = sorted(CONFIG_DIR.glob("*/*.yaml"))


def test_there_are_configs_for_every_job():
    jobs = {p.parent.name for p in YAMLS}
    assert jobs == set(JOB_CONFIGS), f"config folders {jobs} vs jobs {set(JOB_CONFIGS)}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_loads(path: Path):
    cfg = load_job_config(path.parent.name, path)
    assert isinstance(cfg, JOB_CONFIGS[path.parent.name])
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment showing the command that runs it"
    if path.parent.name != "splits":
        assert "tans " in first or "python -m jobs." in first, first


@pytest.mark.timeout(30)
@pytest.mark.parametrize("job", ["data", "demo"])
def test_profiles_exist(job):
    for profile in ("tiny", "local", "full"):
        assert (CONFIG_DIR / job / f"{profile}.yaml").is_file()
