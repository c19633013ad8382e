"""Constraint mask, masked top-k and the Retriever against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tans.space.encoders import ModelEncoder, PerformancePredictor, QueryEncoder, SpaceError
from tans.space.prior import DEFAULT_PRIOR_WEIGHT
from tans.space.retrieval import Retriever, UnsatisfiableConstraint, constraint_mask, topk_cosine

FAMILIES = np.array(["tiny", "w1.0", "w1.2"])


def _index(n=300, seed=0):
    rng = np.random.default_rng(seed)
    n_params = rng.integers(100_000, 10_000_000, n)
    flops = rng.integers(1_000_000, 600_000_000, n)
    families = FAMILIES[rng.integers(0, 3, n)]
    return n_params, flops, families


@pytest.mark.timeout(60)
def test_constraint_mask_property_over_random_limits():
    n_params, flops, families = _index()
    rng = np.random.default_rng(1)
    for trial in range(500):
        max_params = None if trial % 5 == 0 else int(rng.integers(50_000, 11_000_000))
        max_flops = None if trial % 7 == 0 else int(rng.integers(500_000, 700_000_000))
        family = None if trial % 3 == 0 else str(rng.choice(FAMILIES))
        mask = constraint_mask(n_params, flops, families, max_params, max_flops, family)
        brute = np.array([
            (max_params is None or p <= max_params) and (max_flops is None or f <= max_flops)
            and (family is None or fam == family)
            for p, f, fam in zip(n_params, flops, families)
        ])
        assert mask.dtype == bool and np.array_equal(mask, brute)
        if max_params is not None:
            assert (n_params[mask] <= max_params).all()
        if max_flops is not None:
            assert (flops[mask] <= max_flops).all()
    # torch in, torch out
    tmask = constraint_mask(torch.from_numpy(n_params), torch.from_numpy(flops), max_params=5_000_000)
    assert tmask.dtype == torch.bool and np.array_equal(tmask.numpy(), n_params <= 5_000_000)
    with pytest.raises(SpaceError, match="family column"):
        constraint_mask(n_params, flops, family="tiny")


@pytest.mark.timeout(60)
def test_topk_cosine_equals_brute_force_sort():
    g = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    for trial in range(20):
        q = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
        mask = torch.rand(2000, generator=g) < (0.5 if trial else 0.002)
        k = [1, 5, 10, 50][trial % 4]
        idx, sims = topk_cosine(q, index, k, mask)
        rows = [i for i in range(2000) if mask[i]]
        brute = sorted(rows, key=lambda i: -float(index[i] @ q))[:k]
        assert idx.tolist() == brute
        assert torch.allclose(sims, index[idx] @ q)
    idx, _ = topk_cosine(q, index, 3)  # no mask
    assert idx.tolist() == torch.argsort(index @ q, descending=True)[:3].tolist()
    with pytest.raises(SpaceError, match="k must be >= 1"):
        topk_cosine(q, index, 0)


def _retriever(n=60, seed=0):
    torch.manual_seed(seed)
    fam = ((3, 5, 7), (3, 4, 6), (2, 3, 4), 8)
    menc, qenc = ModelEncoder(fam, 16, 32).eval(), QueryEncoder(6, 16, 32).eval()
    pred = PerformancePredictor(16, 32)
    n_params, flops, families = _index(n, seed)
    ks = torch.full((n, 20), 5)
    e = torch.full((n, 20), 4)
    d = torch.full((n, 5), 4)
    with torch.no_grad():
        emb = menc(ks, e, d, torch.randn(n, 8))
    names, tasks = [f"m{i}" for i in range(n)], [f"t{i % 6}" for i in range(n)]
    return Retriever(names, tasks, n_params, flops, families, emb, qenc, pred)


@pytest.mark.timeout(60)
def test_retriever_topk_rerank_and_notes():
    r = _retriever()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 6, generator=g), torch.arange(4).repeat_interleave(5)
    limit = int(np.median(r.n_params))
    res = r.retrieve(x, y, k=7, max_params=limit, rerank=False)
    with torch.no_grad():
        q = r.query_encoder(x, y)
    sims = (r.embeddings @ q).numpy()
    brute = sorted(np.flatnonzero(r.n_params <= limit), key=lambda i: -sims[i])[:7]
    assert [c.model_id for c in res.candidates] == [f"m{i}" for i in brute]
    assert res.requested_k == res.returned_k == 7 and res.note == ""
    assert all(c.n_params <= limit for c in res.candidates)
    reranked = r.retrieve(x, y, k=7, max_params=limit)
    assert {c.model_id for c in reranked.candidates} == {c.model_id for c in res.candidates}
    accs = [c.predicted_accuracy for c in reranked.candidates]
    assert accs == sorted(accs, reverse=True) and all(0 <= a <= 1 for a in accs)
    # k larger than the survivors: all survivors, and a note that says so
    fam = r.retrieve(x, y, k=1000, family="tiny")
    n_tiny = int((r.families == "tiny").sum())
    assert fam.returned_k == n_tiny and fam.requested_k == 1000
    assert f"only {n_tiny} of {len(r)}" in fam.note
    assert all(r.families[int(c.model_id[1:])] == "tiny" for c in fam.candidates)
    with pytest.raises(SpaceError, match="k must be >= 1"):
        r.retrieve(x, y, k=0)


@pytest.mark.timeout(60)
def test_unsatisfiable_constraint_names_the_smallest_model():
    r = _retriever()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 6, generator=g), torch.arange(4).repeat_interleave(5)
    i = int(np.argmin(r.n_params))
    with pytest.raises(UnsatisfiableConstraint) as err:
        r.retrieve(x, y, max_params=int(r.n_params.min()) - 1)
    msg = str(err.value)
    assert f"m{i}" in msg and f"n_params={r.n_params[i]}" in msg and f"flops={r.flops[i]}" in msg
    assert "\n" not in msg and isinstance(err.value, SpaceError)
    with pytest.raises(SpaceError, match="at least 2 classes"):
        r.retrieve(x, torch.zeros(20, dtype=torch.long))


@pytest.mark.timeout(60)
def test_retrieval_blended_with_a_prior_ranks_by_the_standardised_sum_with_the_predictor():
    r = _retriever()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 6, generator=g), torch.arange(4).repeat_interleave(5)
    limit = int(np.median(r.n_params))
    with torch.no_grad():
        q = r.query_encoder(x, y)
        predicted = r.predictor(q[None], r.embeddings).reshape(-1).numpy().astype(np.float64)
    sims = (r.embeddings @ q).numpy().astype(np.float64)
    prior = np.random.default_rng(7).normal(size=len(r))
    kept = np.flatnonzero(r.n_params <= limit)

    def z(v):  # standardised over the rows that meet the constraint, by hand
        return (v - v[kept].mean()) / v[kept].std()

    for weight in (0.5, 3.0):
        res = r.retrieve(x, y, k=6, max_params=limit, prior=prior, prior_weight=weight)
        # the predictor's score, standardised, plus the weighted prior
        brute = sorted(kept, key=lambda i: -(z(predicted)[i] + weight * z(prior)[i]))[:6]
        assert [c.model_id for c in res.candidates] == [f"m{i}" for i in brute]
        assert [c.similarity for c in res.candidates] == pytest.approx([sims[i] for i in brute], abs=1e-5)
        assert [c.predicted_accuracy for c in res.candidates] == pytest.approx([predicted[i] for i in brute],
                                                                              abs=1e-5)
    # a large weight follows the prior; weight 0 is retrieval by the space alone (re-ranked)
    by_prior = r.retrieve(x, y, k=3, max_params=limit, prior=prior, prior_weight=1e6)
    assert [c.model_id for c in by_prior.candidates] == [f"m{i}" for i in sorted(kept, key=lambda i: -prior[i])[:3]]
    plain = r.retrieve(x, y, k=6, max_params=limit)
    assert r.retrieve(x, y, k=6, max_params=limit, prior=prior, prior_weight=0.0) == plain
    with pytest.raises(SpaceError, match="prior has"):
        r.retrieve(x, y, k=6, prior=prior[:-1], prior_weight=1.0)


@pytest.mark.timeout(120)
def test_retrieve_images_blends_the_nearest_dataset_prior_of_the_stored_zoo_queries(tmp_path):
    """What `tans search` and the service rank by, from images: the zoo tasks' stored queries give
    the prior (the query's own task first), blended with the predictor at the default weight."""
    from serve.toy import make_toy_space, toy_images

    r = Retriever.load(make_toy_space(str(tmp_path), "run", seed=0, n_tasks=3, per_task=4))
    assert sorted(r.task_means) == ["run_task0", "run_task1", "run_task2"]
    images, labels = toy_images(3, 4, seed=1)  # the images of run_task1's stored query
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    features = r.encode_images(x)
    prior = r.nearest_prior(features)
    own = r.tasks == "run_task1"
    assert prior[own].min() > prior[~own].max()
    accuracy = r.index_table.column("accuracy").to_numpy()
    assert int(np.argmax(prior)) == int(np.flatnonzero(own)[np.argmax(accuracy[own])])

    _, predicted = r.score_rows(features, torch.as_tensor(labels), np.arange(len(r)))

    def z(v):
        return (v - v.mean()) / v.std()

    blended = r.retrieve_images(x, labels, k=len(r))
    assert blended.prior_weight == DEFAULT_PRIOR_WEIGHT
    brute = sorted(range(len(r)), key=lambda i: -(z(predicted)[i] + DEFAULT_PRIOR_WEIGHT * z(prior)[i]))
    assert [c.model_id for c in blended.candidates] == [str(r.model_ids[i]) for i in brute]
    alone = r.retrieve_images(x, labels, k=5, prior_weight=0)
    assert alone.prior_weight == 0.0 and alone == r.retrieve(features, torch.as_tensor(labels), k=5)
    with pytest.raises(SpaceError, match="2-D"):
        r.nearest_prior(features[0])

    # a space whose zoo tasks have no stored query has no prior: the space alone, and it says so
    bare = Retriever.load(make_toy_space(str(tmp_path), "bare", seed=0, set_latest=False, queries=False))
    assert bare.task_means == {} and bare.nearest_prior(features) is None
    res = bare.retrieve_images(x, labels, k=5)
    assert res.prior_weight == 0.0 and res == bare.retrieve(features, torch.as_tensor(labels), k=5)
