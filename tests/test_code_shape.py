"""Code shape the next engineer can change: short functions, a bounded complexity (ruff's C901 in
`make lint`), and any long function explaining itself."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 100


def long_functions() -> list[tuple[int, str, bool]]:
    """(lines, where, explained) for every function of tans/, jobs/, serve/ over MAX_LINES lines;
    explained: the comment block right above the ``def`` says why (``# long because ...``)."""
    out = []
    for package in ("tans", "jobs", "serve"):
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_LINES:
                        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                        above, i = "", first - 2
                        while i >= 0 and lines[i].lstrip().startswith("#"):
                            above, i = lines[i] + "\n" + above, i - 1
                        where = f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
                        out.append((length, where, "# long because" in above))
    return out


def test_at_most_one_long_function_and_it_says_why():
    found = long_functions()
    assert len(found) <= 1, f"functions over {MAX_LINES} lines: {found}"
    for length, where, explained in found:
        assert explained, f"{where} has {length} lines: split it, or say why above it (# long because ...)"
