"""Transfer labels (``tans.space.transfer``): evaluation records as predictor pairs, and a step that trains on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tans.job_configs import SpaceConfig
from tans.space.encoders import SpaceError
from tans.space.training import SpaceModel, ZooArrays, train_step
from tans.space.transfer import read_transfer_records, transfer_pairs
from tans.storage import Storage

META_TRAIN = {"z_task0", "z_task1", "z_task2", "other_0_5"}


def _zoo(feature_dim=448):
    from serve.toy import toy_zoo_table

    zoo = ZooArrays.from_table(toy_zoo_table("z", 4, 3, seed=0))
    rng = np.random.default_rng(0)
    queries = {t: (rng.normal(loc=i, size=(6, feature_dim)).astype(np.float32), np.repeat([0, 1], 3))
               for i, t in enumerate(["z_task0", "z_task1", "z_task2", "other_0_5"])}
    return zoo.with_task_features(queries), queries


def _record(task, accuracies: dict[str, float | None]) -> dict:
    return {"task": task, "seed": 0, "ground_truth": {m: {"test_accuracy": a} for m, a in accuracies.items()}}


def test_records_become_pairs_on_the_training_rows_only():
    zoo, _ = _zoo()
    train = zoo.subset(zoo.rows_of(["z_task0", "z_task1", "z_task2"]))  # z_task3 plays a meta_val task
    ids = list(zoo.model_ids)
    records = [
        _record("other_0_5", {ids[0]: 0.5, ids[4]: 0.7, ids[10]: 0.9, ids[5]: None}),
        _record("z_task1", {ids[1]: 0.25}),
        _record("other_0_5", {ids[2]: 0.4}),  # a second seed of the same target
    ]
    pairs = transfer_pairs(records, zoo.model_ids, train.model_ids, META_TRAIN)
    assert pairs.tasks == ["other_0_5", "z_task1"]
    # ids[10] is a z_task3 (meta_val) model: left out; ids[5]'s fine-tune failed (None): left out
    assert [train.model_ids[r] for r in pairs.rows] == [ids[0], ids[4], ids[1], ids[2]]
    assert list(pairs.task_of_pair) == [0, 0, 1, 0]
    assert pairs.accuracy.tolist() == pytest.approx([0.5, 0.7, 0.25, 0.4])

    with pytest.raises(SpaceError, match="'z_task3', which is not a meta_train task"):
        transfer_pairs([_record("z_task3", {ids[0]: 0.5})], zoo.model_ids, train.model_ids, META_TRAIN)
    with pytest.raises(SpaceError, match="'m-unknown', which is not in this space's zoo"):
        transfer_pairs([_record("other_0_5", {"m-unknown": 0.5})], zoo.model_ids, train.model_ids, META_TRAIN)


def test_records_are_read_per_run_and_a_missing_or_corrupt_one_is_one_error(tmp_path):
    storage = Storage(str(tmp_path))
    targets = tmp_path / "evaluations" / "run1" / "targets"
    targets.mkdir(parents=True)
    (targets / "b-s0.json").write_text(json.dumps(_record("b", {"m": 0.5})))
    (targets / "a-s0.json").write_text(json.dumps(_record("a", {"m": 0.4})))
    assert [r["task"] for r in read_transfer_records(storage, ["run1"])] == ["a", "b"]
    with pytest.raises(SpaceError, match="'nope' has no finished records"):
        read_transfer_records(storage, ["run1", "nope"])
    (targets / "c-s0.json").write_text('{"task": "c", "ground_')
    with pytest.raises(SpaceError, match="cannot read .*c-s0.json"):
        read_transfer_records(storage, ["run1"])


def _space():
    from tans.zoo.supernets import get_family

    torch.manual_seed(0)
    return SpaceModel(get_family("ofa_mbv3_tiny"), 448, embed_dim=8, hidden=16, predictor_hidden=8,
                      task_features=True)


def test_a_step_with_transfer_pairs_teaches_the_predictor_their_accuracies():
    zoo, queries = _zoo()
    train = zoo.subset(zoo.rows_of(["z_task0", "z_task1", "z_task2"]))
    ids = list(train.model_ids)
    # the rows' own zoo accuracies say nothing about these: every z_task model does 0.9 on
    # other_0_5 when it comes from z_task0 and 0.1 otherwise
    truth = {m: (0.9 if train.tasks[i] == "z_task0" else 0.1) for i, m in enumerate(ids)}
    pairs = transfer_pairs([_record("other_0_5", truth)], zoo.model_ids, train.model_ids, META_TRAIN)
    tasks = ["z_task0", "z_task1", "z_task2"]

    def run(weight: float) -> list[dict]:
        model = _space()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = np.random.default_rng(0)
        return [train_step(model, opt, train, queries, tasks, per_class=2, gen=gen, transfer=pairs,
                           transfer_weight=weight) for _ in range(150)]

    taught, untaught = run(1.0), run(0.0)
    assert {"loss", "contrastive", "mse", "transfer"} <= set(taught[0])
    first = taught[0]
    assert first["loss"] == pytest.approx(first["contrastive"] + first["mse"] + first["transfer"], rel=1e-5)
    assert untaught[0]["loss"] == pytest.approx(untaught[0]["contrastive"] + untaught[0]["mse"], rel=1e-5)
    # with the pairs in the loss their error falls well below its start; with weight 0 it is only measured
    assert np.mean([p["transfer"] for p in taught[-10:]]) < 0.25 * taught[0]["transfer"]
    assert np.mean([p["transfer"] for p in taught[-10:]]) < 0.5 * np.mean([p["transfer"] for p in untaught[-10:]])


def test_config_rejects_a_negative_weight_and_a_bad_run_name():
    SpaceConfig(name="s", zoo="z", transfer_runs=["heldout-1"], transfer_weight=0.5).validate()
    with pytest.raises(ValueError, match="transfer_weight"):
        SpaceConfig(name="s", zoo="z", transfer_weight=-1).validate()
    with pytest.raises(ValueError, match="transfer_runs"):
        SpaceConfig(name="s", zoo="z", transfer_runs=["../up"]).validate()
