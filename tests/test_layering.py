"""The layering, read from the source (imports inside functions included): tans/ never reaches up
into jobs/ or serve/, except the two entry points that sit on top of everything; serve/ never
imports jobs/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The `tans` console script and the `tans.search()` facade run the jobs: they are the top layer.
ENTRY_POINTS = {"tans/cli.py", "tans/__init__.py"}


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
    assert offenders("tans", {"jobs", "serve"}, ENTRY_POINTS) == []
    # the entry points are the only exceptions, and they do use jobs (else the rule is stale)
    assert all("jobs" in imported_packages(REPO / rel) for rel in ENTRY_POINTS)


def test_serve_never_imports_jobs():
    assert offenders("serve", {"jobs"}) == []
