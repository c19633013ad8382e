"""Encoders: permutation invariance, unit norms, predictor range, typed errors on bad queries."""

from __future__ import annotations

import pytest
import torch

from tans.space.encoders import ModelEncoder, PerformancePredictor, QueryEncoder, SpaceError, class_means
from tans.zoo.subnets import N_SLOTS, N_STAGES, SLOTS_PER_STAGE, sample_archs
from tans.zoo.supernets import get_family, list_families

FEATURE_DIM = 12


def _query(n_classes=4, per_class=5, seed=0, dim=FEATURE_DIM):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_classes * per_class, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class) * 3 + 1  # labels need not be 0..C-1
    return x, y


@pytest.mark.timeout(30)
@pytest.mark.parametrize("attention", [False, True])
def test_query_encoder_is_invariant_to_image_and_class_order(attention):
    torch.manual_seed(0)
    enc = QueryEncoder(FEATURE_DIM, embed_dim=16, hidden=32, attention=attention).eval()
    x, y = _query()
    z = enc(x, y)
    assert z.shape == (16,)
    assert z.norm().item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        perm = torch.randperm(len(y), generator=g)
        assert torch.allclose(enc(x[perm], y[perm]), z, atol=1e-6)
    # relabel the classes (a permutation of class order): same set of class means, same embedding
    relabel = {1: 10, 4: 0, 7: 5, 10: 2}
    y2 = torch.tensor([relabel[int(v)] for v in y])
    assert torch.allclose(enc(x, y2), z, atol=1e-6)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("attention", [False, True])
def test_batched_queries_of_different_sizes_match_single(attention):
    torch.manual_seed(0)
    enc = QueryEncoder(FEATURE_DIM, embed_dim=16, hidden=32, attention=attention).eval()
    queries = [_query(2, 3, seed=1), _query(5, 4, seed=2), _query(3, 7, seed=3)]
    batch = enc.encode_many(queries)
    assert batch.shape == (3, 16)
    for i, (x, y) in enumerate(queries):
        assert torch.allclose(batch[i], enc(x, y), atol=1e-6)
    assert torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-6)


@pytest.mark.timeout(30)
def test_query_errors_are_typed_and_one_line():
    enc = QueryEncoder(FEATURE_DIM, embed_dim=8, hidden=16)
    x, y = _query(dim=FEATURE_DIM + 1)
    with pytest.raises(SpaceError, match="feature size 13 differs") as err:
        enc(x, y)
    assert "\n" not in str(err.value)
    x, y = _query(n_classes=1)
    with pytest.raises(SpaceError, match="at least 2 classes"):
        enc(x, y)
    with pytest.raises(SpaceError, match="at least 2 classes"):
        enc.encode_many([_query(), _query(n_classes=1)])
    assert issubclass(SpaceError, ValueError)


@pytest.mark.timeout(30)
def test_class_means_values():
    x = torch.tensor([[0.0, 2.0], [4.0, 6.0], [1.0, 1.0]])
    y = torch.tensor([5, 5, 2])
    assert torch.equal(class_means(x, y), torch.tensor([[1.0, 1.0], [2.0, 4.0]]))


def _arch(family, n, seed=0):
    archs = sample_archs(family, n, seed)
    return tuple(torch.tensor([getattr(a, name) for a in archs]) for name in ("ks", "e", "d"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("family_name", list_families())
def test_model_encoder_and_predictor_on_real_families(family_name):
    torch.manual_seed(0)
    assert (N_SLOTS, N_STAGES, SLOTS_PER_STAGE) == (20, 5, 4)  # the layout the encoder assumes
    family = get_family(family_name)
    enc = ModelEncoder(family, embed_dim=16, hidden=32).eval()
    ks, e, d = _arch(family, 6)
    f_emb = torch.randn(6, family.penultimate_dim)
    z = enc(ks, e, d, f_emb)
    assert z.shape == (6, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(enc(ks[0], e[0], d[0], f_emb[0]), z[0], atol=1e-6)
    arch = enc.arch_features(ks, e, d)
    assert float(arch.min()) >= 0 and float(arch.max()) <= 1
    assert torch.equal(arch[:, :20] == 0, ks == 0)  # 0 exactly marks the unused slots
    with pytest.raises(SpaceError, match="f_emb size"):
        enc(ks, e, d, torch.randn(6, family.penultimate_dim + 1))
    pred = PerformancePredictor(16, hidden=32)
    q = torch.nn.functional.normalize(torch.randn(16), dim=0)
    acc = pred(q[None], z * 50).detach()  # even extreme inputs stay in [0, 1]
    assert acc.shape == (6,) and float(acc.min()) >= 0 and float(acc.max()) <= 1


@pytest.mark.timeout(30)
def test_model_encoder_from_choice_tuple():
    enc = ModelEncoder(((3, 5, 7), (3, 4, 6), (2, 3, 4), 8), embed_dim=8, hidden=16)
    ks = torch.tensor([[3, 5, 7, 0] * 5])
    e = torch.tensor([[3, 4, 6, 0] * 5])
    d = torch.tensor([[2, 3, 4, 3, 2]])
    arch = enc.arch_features(ks, e, d)[0]
    third = pytest.approx([1 / 3, 2 / 3, 1.0, 0.0], abs=1e-6)
    assert arch[:4].tolist() == third and arch[20:24].tolist() == third
    assert arch[40:].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3], abs=1e-6)
