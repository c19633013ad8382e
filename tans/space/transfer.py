"""Transfer labels: what zoo models reached when fine-tuned on *other* tasks, for the predictor.

The zoo measures each model on its own task only, so the performance predictor never sees the
quantity a search ranks by: how well a model does once fine-tuned on a new dataset. ``tans
evaluate`` measures exactly that (its ground truth: every pool model fine-tuned on the target
with the search's recipe). Its records of *meta_train* targets are training data like the zoo's
own accuracies, so a space may learn from them (``transfer_runs`` of ``tans train-space``): each
(target task, zoo model, fine-tuned test accuracy) becomes one more predictor pair.

Only meta_train targets may teach the space (meta_val chooses its checkpoint, meta_test judges
it), and only models of the zoo's meta_train tasks (a meta_val task's rows, and so its query
feature through the model encoder's task features, stay unseen). No ``import ray``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tans import paths
from tans.space.encoders import SpaceError
from tans.storage import Storage, StorageError


@dataclass
class TransferPairs:
    """Predictor pairs from ground-truth fine-tunes: pair i is zoo row ``rows[i]`` fine-tuned on
    ``tasks[task_of_pair[i]]`` to test accuracy ``accuracy[i]``."""

    tasks: list[str]
    task_of_pair: np.ndarray  # int64, one per pair
    rows: np.ndarray  # int64 rows of the zoo arrays the training loop holds
    accuracy: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.rows)


def read_transfer_records(storage: Storage, runs: list[str]) -> list[dict]:
    """Every finished record (``evaluations/<run>/targets/*.json``) of each run, in run then file order."""
    records = []
    for run in runs:
        folder = paths.evaluation_targets_dir(run)
        files = storage.list_files(folder, ".json")  # root-relative paths, sorted
        if not files:
            raise SpaceError(f"transfer_runs: evaluation run {run!r} has no finished records under "
                             f"{storage.uri_of(folder)} (run `tans evaluate ... --name {run}` first)")
        for rel in files:
            try:
                records.append(storage.read_json(rel))
            except (OSError, ValueError, StorageError) as e:  # an unreadable or corrupt JSON file
                raise SpaceError(f"transfer_runs: cannot read {storage.uri_of(rel)}: {e}") from None
    return records


def transfer_pairs(records: list[dict], zoo_model_ids, model_ids: np.ndarray, meta_train: set[str]) -> TransferPairs:
    """The pairs of ``records`` on the rows ``model_ids`` (the training loop's zoo arrays: the zoo's
    meta_train tasks); fine-tunes of other zoo models (a meta_val task's) are left out.

    ``zoo_model_ids``: every model of the zoo (a record's model outside it means the run judged
    another zoo: error); ``meta_train``: the tasks a record's target must belong to.
    """
    in_zoo = set(zoo_model_ids)
    row_of = {m: i for i, m in enumerate(model_ids)}
    tasks: list[str] = []
    task_of_pair, rows, accuracy = [], [], []
    for record in records:
        task = record.get("task")
        if task not in meta_train:
            raise SpaceError(f"transfer_runs: a record targets {task!r}, which is not a meta_train task of the "
                             "splits: only meta_train targets may teach the space (meta_val picks its checkpoint, "
                             "meta_test judges it)")
        for model_id, truth in (record.get("ground_truth") or {}).items():
            if model_id not in in_zoo:
                raise SpaceError(f"transfer_runs: the record of {task!r} holds model {model_id!r}, which is not "
                                 "in this space's zoo (the run judged another zoo)")
            acc = truth.get("test_accuracy")
            if acc is None or model_id not in row_of:
                continue
            if task not in tasks:
                tasks.append(task)
            task_of_pair.append(tasks.index(task))
            rows.append(row_of[model_id])
            accuracy.append(float(acc))
    return TransferPairs(tasks, np.asarray(task_of_pair, dtype=np.int64), np.asarray(rows, dtype=np.int64),
                         np.asarray(accuracy, dtype=np.float32))
