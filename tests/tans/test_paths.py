"""tans.paths owns the storage layout: each helper spells the literal on-disk path (a layout change is
a deliberate edit here), the old helpers delegate to it, and nothing else spells a root folder."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tans import paths

REPO = Path(__file__).resolve().parents[2]
ROOT_PREFIXES = tuple(f"{name}/" for name in ("tasks", "queries", "zoo", "supernets", "spaces", "searches",
                                              "evaluations", "demo"))


@pytest.mark.parametrize("got, want", [
    (paths.task_dir("fashion_0_5"), "tasks/fashion_0_5"),
    (paths.queries_dir("sn-64"), "queries/sn-64"),
    (paths.query_file("sn-64", "fashion_0_5"), "queries/sn-64/fashion_0_5.parquet"),
    (paths.extractor_file("sn-64"), "queries/sn-64/extractor.json"),
    (paths.zoo_dir("local"), "zoo/local"),
    (paths.zoo_manifest("local"), "zoo/local/zoo.json"),
    (paths.zoo_parts_dir("local"), "zoo/local"),
    (paths.zoo_parts_dir("local", "g-1a2b"), "zoo/local/g-1a2b"),
    (paths.zoo_part_file("local", "mnist_0_5"), "zoo/local/part-mnist_0_5.parquet"),
    (paths.zoo_part_file("local", "mnist_0_5", "g-1a2b"), "zoo/local/g-1a2b/part-mnist_0_5.parquet"),
    (paths.zoo_build_file("local"), "zoo/local/build.json"),
    (paths.zoo_build_file("local", "g-1a2b"), "zoo/local/g-1a2b/build.json"),
    (paths.supernet_dir("local"), "supernets/local"),
    (paths.supernet_config_file("local"), "supernets/local/config.json"),
    (paths.base_dir("local"), "supernets/local/base"),
    (paths.base_dir("local", "g-1a2b"), "supernets/local/g-1a2b/base"),
    (paths.task_supernet_file("local", "mnist_0_5"), "supernets/local/tasks/mnist_0_5/model.pt"),
    (paths.task_supernet_file("local", "mnist_0_5", "g-1a2b"), "supernets/local/g-1a2b/tasks/mnist_0_5/model.pt"),
    (paths.space_dir("run1"), "spaces/run1"),
    (paths.LATEST_SPACE, "spaces/LATEST"),
    (paths.search_dir("run1"), "searches/run1"),
    (paths.evaluation_dir("run1"), "evaluations/run1"),
    (paths.evaluation_cache_dir("local"), "evaluations/_cache/local"),
    (paths.DEMO_DIR, "demo"),
    (paths.DEMO_CONFIG, "demo/config.json"),
    (paths.DEMO_TABLE_JSON, "demo/table.json"),
    (paths.DEMO_TABLE_MD, "demo/table.md"),
    (paths.ROOT_FOLDERS, ("tasks", "queries", "zoo", "supernets", "spaces", "searches", "evaluations", "demo")),
])
def test_each_path_is_the_literal_layout(got, want):
    assert got == want


def test_the_old_helpers_delegate_to_tans_paths():
    from jobs._zoo_workers import task_supernet_rel
    from jobs.pretrain_supernet import base_dir
    from tans.data.tasks import TaskError, task_dir
    from tans.space.features import query_path
    from tans.space.store import LATEST, files_dir, space_dir
    from tans.zoo.store import base_folder, part_path, zoo_dir

    assert task_dir("fashion_0_5") == "tasks/fashion_0_5"
    with pytest.raises(TaskError):  # the task helper still checks the name
        task_dir("../escape")
    assert query_path("sn-64", "t") == "queries/sn-64/t.parquet"
    assert (LATEST, space_dir("r"), files_dir("r", "g-1")) == ("spaces/LATEST", "spaces/r", "spaces/r/g-1")
    assert zoo_dir("z") == "zoo/z"
    assert part_path("z", "t", "g-1") == "zoo/z/g-1/part-t.parquet"
    assert base_folder("z", "g-1") == "supernets/z/g-1/base"
    assert base_dir("z") == "supernets/z/base"
    assert task_supernet_rel("z", "t", "g-1") == "supernets/z/g-1/tasks/t/model.pt"


def test_tans_paths_imports_only_the_standard_library():
    tree = ast.parse((REPO / "tans/paths.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def hand_spelled_paths(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal, or f-string's leading text, that starts with ``<root folder>/``."""
    tree = ast.parse(source)
    # an f-string's parts are judged as one string (by its leading text), not one by one
    skip = _docstrings(tree) | {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                                for part in node.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            text = head.value if isinstance(head, ast.Constant) and isinstance(head.value, str) else ""
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        else:
            continue
        if text.startswith(ROOT_PREFIXES):
            found.append((node.lineno, text))
    return found


def test_the_scanner_finds_strings_and_f_strings_but_not_docstrings():
    source = ('"""tasks/<name> in a docstring."""\n'
              'def f(run, space):\n'
              '    """spaces/<run>"""\n'
              '    a = f"searches/{run}"  # zoo/ in a comment\n'
              '    b = "spaces/" + space\n'
              '    c = f"{run}/tasks/x" + f"{run}zoo/"\n'
              '    return a, b, c, "zoo"\n')
    assert sorted(hand_spelled_paths(source)) == [(4, "searches/"), (5, "spaces/")]


def test_no_module_but_tans_paths_spells_a_storage_path():
    offenders = []
    for package in ("tans", "jobs", "serve"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "tans/paths.py":
                continue
            offenders += [f"{rel}:{line}: {text!r}" for line, text in hand_spelled_paths(path.read_text())]
    assert offenders == [], "spell these with tans.paths:\n" + "\n".join(offenders)


def test_every_root_folder_has_a_rebuild_hint_and_no_other_does():
    from tans.storage import REBUILD_COMMANDS, rebuild_hint

    assert set(REBUILD_COMMANDS) == set(paths.ROOT_FOLDERS)
    assert rebuild_hint(f"{paths.search_dir('r')}/model/model.pt").startswith("`tans search")
    assert rebuild_hint("elsewhere/x.pt") == "the command that wrote it"
