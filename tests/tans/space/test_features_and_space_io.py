"""Feature extractors (supernet and ResNet-18 checkpoints), query files, and a space on storage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision

from tans.space.features import (
    ExtractorError,
    ExtractorSpec,
    build_extractor,
    read_query,
    sample_per_class,
    write_query,
)
from tans.space.retrieval import Retriever
from tans.space.store import SpaceNotFound, finish_space, index_table, load_space, save_model_state
from tans.space.training import SpaceModel, ZooArrays, index_embeddings
from tans.storage import Storage
from tans.zoo.store import ZOO_SCHEMA
from tans.zoo.supernets import get_family


def _images(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_sample_per_class_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [10, 3, 10, 7])
    a = sample_per_class(labels, 5, seed=1)
    assert np.array_equal(a, sample_per_class(labels, 5, seed=1))
    assert not np.array_equal(a, sample_per_class(labels, 5, seed=2))
    assert np.bincount(labels[a]).tolist() == [5, 3, 5, 5]  # a smaller class gives all it has


def test_supernet_extractor_uses_the_checkpoint_and_is_per_image(tmp_path):
    family = get_family("ofa_mbv3_tiny")
    torch.manual_seed(0)
    net = family.build(7)
    path = tmp_path / "base.pt"
    torch.save(net.state_dict(), path)
    spec = ExtractorSpec(kind="supernet", uri=str(path), family="ofa_mbv3_tiny", image_size=32)
    ex = build_extractor(spec)
    x = _images(12)
    feats = ex(x)
    assert feats.shape == (12, family.penultimate_dim) and ex.feature_dim == family.penultimate_dim
    # per-image (eval mode): a permutation of the images permutes the features
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ex(x[perm]), feats[perm], rtol=1e-4, atol=0) and feats.abs().max() > 0
    # grayscale and other sizes are accepted (expanded, resized)
    assert ex(_images(2, size=20)[:, :1]).shape == (2, family.penultimate_dim)
    # other weights, other features: the checkpoint is really used
    torch.save(family.build(7).state_dict(), tmp_path / "other.pt")
    other = build_extractor(ExtractorSpec(kind="supernet", uri=str(tmp_path / "other.pt"), family="ofa_mbv3_tiny",
                                          image_size=32))
    assert not torch.allclose(other(x), feats, rtol=1e-2, atol=0)


def test_resnet18_extractor_loads_a_checkpoint_the_test_saves(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    ex = build_extractor(ExtractorSpec(kind="resnet18", uri=str(path), image_size=32))
    x = _images(4)
    feats = ex(x)
    assert feats.shape == (4, 512)
    # same as torchvision's network without its fc, on ImageNet-normalised input
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = ref((x.float() / 255 - mean) / std)
    assert torch.allclose(feats, expected, atol=1e-4)
    assert ExtractorSpec(kind="resnet18", uri=str(path), image_size=32).name.startswith("resnet18-32px-")

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractorError, match="junk.pt"):
        build_extractor(ExtractorSpec(kind="resnet18", uri=str(tmp_path / "junk.pt"), image_size=32))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ExtractorError, match="ResNet-18"):
        build_extractor(ExtractorSpec(kind="resnet18", uri=str(tmp_path / "wrong.pt"), image_size=32))
    with pytest.raises(ExtractorError, match="kind"):
        ExtractorSpec(kind="vit", uri="x")


def test_query_files_round_trip(tmp_path):
    st = Storage(str(tmp_path))
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    write_query(st, "ex", "t1", x, y)
    x2, y2 = read_query(st, "ex", "t1")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def _toy_zoo(n_tasks=3, per_task=4, f_dim=448, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        for m in range(per_task):
            d = [int(v) for v in rng.choice([2, 3], 5)]
            ks = [int(rng.choice([3, 5])) for _ in range(20)]
            e = [int(rng.choice([3, 4])) for _ in range(20)]
            rows.append(
                {
                    "model_id": f"m{t}-{m}",
                    "task": f"t{t}",
                    "family": "ofa_mbv3_tiny",
                    "ks": ks,
                    "e": e,
                    "d": d,
                    "accuracy": float(rng.uniform(0.3, 0.9)),
                    "n_params": int(rng.integers(1e5, 1e6)),
                    "flops": int(rng.integers(1e6, 1e7)),
                    "f_emb": rng.normal(size=f_dim).astype(np.float32).tolist(),
                    "supernet_uri": "x",
                    "image_size": 32,
                    "created_at": "",
                }
            )
    return pa.Table.from_pylist(rows, schema=ZOO_SCHEMA)


def test_a_saved_space_loads_into_the_same_retriever(tmp_path):
    family = get_family("ofa_mbv3_tiny")
    torch.manual_seed(0)
    model = SpaceModel(family, feature_dim=16, embed_dim=8, hidden=16, predictor_hidden=8).eval()
    table = _toy_zoo()
    zoo = ZooArrays.from_table(table)
    emb = index_embeddings(model, zoo)
    st = Storage(str(tmp_path))
    with pytest.raises(SpaceNotFound, match="train-space"):
        load_space(str(tmp_path))
    save_model_state(st, "run1", model.state_dict())
    st.write_parquet("spaces/run1/index.parquet", index_table(table, emb))
    with pytest.raises(SpaceNotFound, match="space.json"):  # not finished: no space.json yet
        load_space(str(tmp_path / "spaces" / "run1"))
    info = {"run": "run1", "zoo": "toy", "family": "ofa_mbv3_tiny", "image_size": 32, "feature_dim": 16,
            "extractor": ExtractorSpec(kind="supernet", uri="", family="ofa_mbv3_tiny", image_size=32).to_dict(),
            "architecture": {"embed_dim": 8, "hidden": 16, "attention": False, "predictor_hidden": 8}}
    finish_space(st, "run1", info)
    loaded = Retriever.load(str(tmp_path))
    direct = Retriever(zoo.model_ids, zoo.tasks, zoo.n_params, zoo.flops, zoo.families, emb,
                       model.query_encoder, model.predictor)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4).repeat(5)
    a, b = loaded.retrieve(x, y, k=5), direct.retrieve(x, y, k=5)
    assert [c.model_id for c in a.candidates] == [c.model_id for c in b.candidates]
    assert [round(c.predicted_accuracy, 5) for c in a.candidates] == [
        round(c.predicted_accuracy, 5) for c in b.candidates
    ]
    assert loaded.info["run"] == "run1" and loaded.row_of("m1-2") is not None and loaded.row_of("nope") is None
    with pytest.raises(ValueError, match="feature size"):
        loaded.retrieve(torch.randn(8, 15), torch.arange(2).repeat(4), k=3)
    with pytest.raises(ValueError, match="2 classes"):
        loaded.retrieve(torch.randn(8, 16), torch.zeros(8, dtype=torch.long), k=3)
