"""The built wheel, installed outside the checkout, runs its config-driven commands.

The wheel is built from a copy of the project (so the checkout gets no build/ folder), installed
with --no-deps into a fresh virtual environment whose dependencies come from the test
environment's site-packages (a .pth line: the editable install's own .pth files there are not
processed, so nothing points back at the checkout), and run from a directory outside the
checkout with PYTHONPATH unset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, tans script, clean env, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("tans-*.whl"))
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.check_output([str(python), "-c", where], text=True).strip())
    (purelib / "_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return python, env_dir / "bin" / "tans", env, work


def _run(installed, *args, timeout=240):
    _, tans, env, work = installed
    return subprocess.run([str(tans), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_the_installed_package_is_the_wheel_with_its_configs(installed):
    python, _, env, work = installed
    out = subprocess.run([str(python), "-c", "import tans, serve, jobs; from tans.job_configs import CONFIG_DIR, "
                          "profiles; print(tans.__file__); print(serve.__file__); print(CONFIG_DIR); "
                          "print(','.join(profiles('search')))"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    tans_file, serve_file, config_dir, search_profiles = out.stdout.split()
    env_dir = python.parent.parent
    for path in (tans_file, serve_file, config_dir):
        assert Path(path).is_relative_to(env_dir), path
        assert not Path(path).is_relative_to(REPO), path
    assert set(search_profiles.split(",")) >= {"tiny", "local", "full", "demo"}
    # every YAML of the checkout ships, byte for byte
    shipped = {p.relative_to(config_dir).as_posix(): p.read_bytes() for p in Path(config_dir).rglob("*.yaml")}
    source = {p.relative_to(REPO / "configs").as_posix(): p.read_bytes() for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == source


@pytest.mark.timeout(900)
def test_commands_run_from_outside_the_checkout(installed, tmp_path):
    help_ = _run(installed, "--help")
    assert help_.returncode == 0 and "search" in help_.stdout, help_.stderr[-2000:]
    listing = _run(installed, "data", "list")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "digits" in listing.stdout
    # a profile name resolves from the installed package; the ingest runs for real
    root = tmp_path / "root"
    ingest = _run(installed, "data", "ingest", "builtin:digits", "--root", str(root), "--config", "tiny")
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert (root / "tasks" / "digits_0_5" / "task.json").is_file()
    # config-driven commands get past their configs (which name each other as configs/...) and
    # stop at the first thing this empty root lacks, in one line
    for args in (["search", "--config", "tiny", "--dataset", "digits_0_5", "--root", str(root)],
                 ["evaluate", "--config", "tiny", "--root", str(root)],
                 ["serve", "--root", str(root)]):
        proc = _run(installed, *args)
        assert proc.returncode == 1, (args, proc.stderr[-3000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "space" in lines[0] and "config file not found" not in lines[0], (args, lines)
    # the demo's profile and every config it names resolve (an unknown key stops it before any work)
    demo = _run(installed, "demo", "--config", "tiny", "--root", str(root), "no_such_key=1")
    assert demo.returncode == 2 and "no_such_key" in demo.stderr, demo.stderr[-3000:]
    unknown = _run(installed, "search", "--config", "nonesuch", "--dataset", "digits_0_5", "--root", str(root))
    assert unknown.returncode == 2 and "profiles: demo, full, gpu, local, tiny" in unknown.stderr, unknown.stderr
