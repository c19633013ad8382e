"""The layering, read from the source (imports inside functions included): tans/ never reaches up
into jobs/ or serve/, not even for the `tans` command or the Python API (those live in jobs/cli.py
and jobs/api.py), and never imports ray; serve/ never imports jobs/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in ``path``, at any depth (functions, branches)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def offenders(package: str, forbidden: set[str], allowed: set[str] = frozenset()) -> list[str]:
    out = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel not in allowed and imported_packages(path) & forbidden:
            out.append(f"{rel} imports {sorted(imported_packages(path) & forbidden)}")
    return out


def test_the_scanner_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    if True:\n        from jobs.search import search\n"
                   "    import serve.app as a\n")
    assert imported_packages(src) == {"os", "jobs", "serve"}


def test_the_scan_reaches_every_stage_subpackage():
    scanned = {path.relative_to(REPO / "tans").parts[0] for path in (REPO / "tans").rglob("*.py")}
    assert {"data", "zoo", "space", "selection"} <= scanned
    assert (REPO / "tans/data/builtin/registry.py") in set((REPO / "tans").rglob("*.py"))


def test_tans_never_imports_jobs_or_serve():
    assert offenders("tans", {"jobs", "serve"}) == []


def test_the_entry_points_sit_in_the_ray_layer():
    # the console script and the Python API run the jobs, so they are jobs/ modules
    assert "jobs" in imported_packages(REPO / "jobs/cli.py") and "jobs" in imported_packages(REPO / "jobs/api.py")
    assert 'tans = "jobs.cli:main"' in (REPO / "pyproject.toml").read_text()


def test_tans_holds_no_ray_code():
    # Ray glue (starting Ray, Ray Data readers) is jobs/runtime.py; the library is Ray-free
    # in every module, not only in the ones `import tans` happens to load
    assert offenders("tans", {"ray"}) == []
    assert "ray" in imported_packages(REPO / "jobs/runtime.py")


def test_serve_never_imports_jobs():
    assert offenders("serve", {"jobs"}) == []
