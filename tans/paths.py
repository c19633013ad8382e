"""Every storage path, in one place: where each artifact lives under a storage root.

Paths are relative to the root (:class:`tans.storage.Storage`) and use ``/``. Jobs and library
modules ask this module for them and never spell a folder by hand, so this docstring is the map:

.. code-block:: text

    <root>/
      tasks/<task>/                           task_dir(task)  (task.json, splits: tans.data.tasks)
      queries/<extractor>/                    queries_dir(extractor)
        extractor.json                        extractor_file(extractor)
        <task>.parquet                        query_file(extractor, task)
      zoo/<zoo>/                              zoo_dir(zoo)
        zoo.json                              zoo_manifest(zoo)  (written last: the swap)
        [<generation>/]                       zoo_parts_dir(zoo, generation)
          part-<task>.parquet                 zoo_part_file(zoo, task, generation)
          build.json                          zoo_build_file(zoo, generation)
      supernets/<zoo>/                        supernet_dir(zoo)
        config.json                           supernet_config_file(zoo)
        [<generation>/]base/                  base_dir(zoo, generation)  (model.pt, done.json, ray_train/, tb/)
        [<generation>/]tasks/<task>/model.pt  task_supernet_file(zoo, task, generation)
      spaces/<run>/                           space_dir(run)  (space.json, [g-<id>/] model.pt, index.parquet...)
      spaces/LATEST                           LATEST_SPACE
      searches/<run>/                         search_dir(run)  (run.json, report.json, model/ = the export...)
      evaluations/<run>/                      evaluation_dir(run)  (evaluation.json, evaluation.md)
      evaluations/_cache/<zoo>/               evaluation_cache_dir(zoo)
      demo/                                   DEMO_DIR
        config.json                           DEMO_CONFIG
        table.json, table.md                  DEMO_TABLE_JSON, DEMO_TABLE_MD

``<generation>`` is "" (the first build) or a ``g-<id>`` folder that a ``--force`` rebuild writes
beside the live files before one atomic write swaps it in. Names are not checked here (callers
such as :func:`tans.data.tasks.task_dir` check them); this module imports only the standard library.
"""

from __future__ import annotations

# The top-level folders of a storage root.
TASKS = "tasks"
QUERIES = "queries"
ZOO = "zoo"
SUPERNETS = "supernets"
SPACES = "spaces"
SEARCHES = "searches"
EVALUATIONS = "evaluations"
DEMO_DIR = "demo"

ROOT_FOLDERS = (TASKS, QUERIES, ZOO, SUPERNETS, SPACES, SEARCHES, EVALUATIONS, DEMO_DIR)


def _in_generation(folder: str, generation: str) -> str:
    """``folder`` or ``folder/<generation>``."""
    return f"{folder}/{generation}" if generation else folder


# -- data ----------------------------------------------------------------------------------------


def task_dir(task: str) -> str:
    return f"{TASKS}/{task}"


# -- queries (a task's features through an extractor) --------------------------------------------


def queries_dir(extractor: str) -> str:
    return f"{QUERIES}/{extractor}"


def query_file(extractor: str, task: str) -> str:
    return f"{queries_dir(extractor)}/{task}.parquet"


def extractor_file(extractor: str) -> str:
    """The spec of the extractor that made the queries (its sha256 says when they are stale)."""
    return f"{queries_dir(extractor)}/extractor.json"


# -- zoo -----------------------------------------------------------------------------------------


def zoo_dir(zoo: str) -> str:
    return f"{ZOO}/{zoo}"


def zoo_manifest(zoo: str) -> str:
    return f"{zoo_dir(zoo)}/zoo.json"


def zoo_parts_dir(zoo: str, generation: str = "") -> str:
    return _in_generation(zoo_dir(zoo), generation)


def zoo_part_file(zoo: str, task: str, generation: str = "") -> str:
    return f"{zoo_parts_dir(zoo, generation)}/part-{task}.parquet"


def zoo_build_file(zoo: str, generation: str = "") -> str:
    return f"{zoo_parts_dir(zoo, generation)}/build.json"


# -- supernets -----------------------------------------------------------------------------------


def supernet_dir(zoo: str) -> str:
    return f"{SUPERNETS}/{zoo}"


def supernet_config_file(zoo: str) -> str:
    return f"{supernet_dir(zoo)}/config.json"


def base_dir(zoo: str, generation: str = "") -> str:
    """The base supernet's folder."""
    return f"{_in_generation(supernet_dir(zoo), generation)}/base"


def task_supernet_file(zoo: str, task: str, generation: str = "") -> str:
    """A task's fine-tuned supernet."""
    return f"{_in_generation(supernet_dir(zoo), generation)}/tasks/{task}/model.pt"


# -- spaces, searches, evaluations, demo ---------------------------------------------------------


def space_dir(run: str) -> str:
    return f"{SPACES}/{run}"


LATEST_SPACE = f"{SPACES}/LATEST"


def search_dir(run: str) -> str:
    return f"{SEARCHES}/{run}"


def evaluation_dir(run: str) -> str:
    return f"{EVALUATIONS}/{run}"


def evaluation_targets_dir(run: str) -> str:
    """An evaluation's finished records, one ``<task>-s<seed>.json`` per target and seed."""
    return f"{evaluation_dir(run)}/targets"


def evaluation_cache_dir(zoo: str) -> str:
    """Per-(task, seed) measurements of an evaluation, shared by every run on the zoo."""
    return f"{EVALUATIONS}/_cache/{zoo}"


DEMO_CONFIG = f"{DEMO_DIR}/config.json"
DEMO_TABLE_JSON = f"{DEMO_DIR}/table.json"
DEMO_TABLE_MD = f"{DEMO_DIR}/table.md"
