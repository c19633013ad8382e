"""A space whose model encoder also reads its zoo task's mean query feature (``task_features``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tans.space.encoders import ModelEncoder, SpaceError
from tans.space.training import SpaceModel, ZooArrays, index_embeddings, train_step

FAMILY = ((3, 5, 7), (3, 4, 6), (2, 3, 4), 8)


def _rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, 2, (n, 20), generator=g) * 2 + 3
    e = torch.randint(3, 5, (n, 20), generator=g)
    d = torch.randint(2, 5, (n, 5), generator=g)
    return ks, e, d, torch.randn(n, 8, generator=g)


def test_the_model_encoder_reads_task_features_exactly_when_it_has_a_task_dim():
    torch.manual_seed(0)
    ks, e, d, f = _rows(4)
    with_task = ModelEncoder(FAMILY, embed_dim=8, hidden=16, task_dim=6).eval()
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    out = with_task(ks, e, d, f, a)
    assert out.shape == (4, 8) and torch.allclose(out.norm(dim=1), torch.ones(4))
    assert not torch.allclose(out, with_task(ks, e, d, f, b))  # the task's data changes the embedding
    assert torch.allclose(with_task(ks[0], e[0], d[0], f[0], a[0]), out[0], atol=1e-6)  # one row, no batch dim
    with pytest.raises(SpaceError, match="task_dim=6"):
        with_task(ks, e, d, f)
    with pytest.raises(SpaceError, match="task feature size 5"):
        with_task(ks, e, d, f, torch.randn(4, 5))
    with pytest.raises(SpaceError, match="takes no task features"):
        ModelEncoder(FAMILY, embed_dim=8, hidden=16)(ks, e, d, f, a)


def _zoo(n_tasks=4, per_task=3, feature_dim=448):
    from serve.toy import toy_zoo_table

    zoo = ZooArrays.from_table(toy_zoo_table("z", n_tasks, per_task, seed=0))
    rng = np.random.default_rng(0)
    queries = {f"z_task{t}": (rng.normal(loc=t, size=(6, feature_dim)).astype(np.float32), np.repeat([0, 1], 3))
               for t in range(n_tasks - 1)}  # the last task has no stored query
    return zoo, queries


def test_zoo_rows_carry_their_tasks_mean_query_feature():
    zoo, queries = _zoo()
    with_feat = zoo.with_task_features(queries)
    assert zoo.task_feat is None and with_feat.task_feat.shape == (len(zoo), 448)
    for i, t in enumerate(zoo.tasks):
        expected = queries[t][0].mean(axis=0) if t in queries else np.zeros(448)
        assert with_feat.task_feat[i].numpy() == pytest.approx(expected, abs=1e-5)
    part = with_feat.subset(np.array([1, 4]))
    assert list(part.model_ids) == [zoo.model_ids[1], zoo.model_ids[4]]
    assert torch.equal(part.task_feat, with_feat.task_feat[[1, 4]])


def test_a_task_features_space_trains_and_indexes_and_its_architecture_is_recorded():
    from tans.space.store import build_space_model
    from tans.zoo.supernets import get_family

    zoo, queries = _zoo()
    zoo = zoo.with_task_features(queries)
    torch.manual_seed(0)
    model = SpaceModel(get_family("ofa_mbv3_tiny"), 448, embed_dim=8, hidden=16, predictor_hidden=8,
                       task_features=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = sorted(queries)
    parts = train_step(model, opt, zoo, queries, tasks, per_class=2, gen=np.random.default_rng(0))
    assert np.isfinite(parts["loss"]) and parts["contrastive"] >= 0
    emb = index_embeddings(model, zoo)
    assert emb.shape == (len(zoo), 8)
    with pytest.raises(SpaceError, match="with_task_features"):
        index_embeddings(model, ZooArrays.from_table(_toy_table()))

    info = {"family": "ofa_mbv3_tiny", "feature_dim": 448,
            "architecture": {"embed_dim": 8, "hidden": 16, "attention": False, "predictor_hidden": 8}}
    assert build_space_model(info).model_encoder.task_dim == 0  # a space trained before the option
    info["architecture"]["task_features"] = True
    rebuilt = build_space_model(info)
    assert rebuilt.model_encoder.task_dim == 448
    rebuilt.load_state_dict(model.state_dict())  # same shapes: the flag is all the space needs


def _toy_table():
    from serve.toy import toy_zoo_table

    return toy_zoo_table("z", 2, 2, seed=1)


def test_a_reused_space_trained_with_other_architecture_settings_is_named():
    from jobs.train_space import _architecture, _architecture_changes
    from tans.job_configs import SpaceConfig

    cfg = SpaceConfig()
    assert _architecture_changes(_architecture(cfg), cfg) == []
    before_the_option = {k: v for k, v in _architecture(cfg).items() if k != "task_features"}
    assert _architecture_changes(before_the_option, cfg) == ["task_features=False"]
    assert _architecture_changes({**_architecture(cfg), "embed_dim": 64}, cfg) == ["embed_dim=64"]
