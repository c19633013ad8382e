"""Transferability scorers: sane orderings on synthetic features, determinism, input checks, formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from tans.selection.transferability import SCORERS, hscore, linear_probe, logme, nleep

NAMES = sorted(SCORERS)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # as tests/tans/conftest.py does for torch: on two shared cores, a multi-threaded BLAS waiting on a
    # descheduled thread makes a 300 x 1280 SVD take seconds instead of milliseconds
    with threadpool_limits(limits=1):
        yield


def blobs(n_per_class: int = 50, k: int = 4, d: int = 32, separation: float = 10.0, seed: int = 0):
    """Gaussian clusters (unit noise) around class centres ``separation`` apart on average."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * separation / np.sqrt(2 * d)
    y = np.repeat(np.arange(k), n_per_class)
    f = centres[y] * np.sqrt(d) + rng.normal(size=(y.size, d))
    return f, y


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", NAMES)
def test_separated_clusters_beat_shuffled_labels_and_noise(name):
    score = SCORERS[name]
    f, y = blobs()
    shuffled = np.random.default_rng(1).permutation(y)
    noise = np.random.default_rng(2).normal(size=f.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary inputs must not warn
        good, bad, noisy = score(f, y), score(f, shuffled), score(noise, y)
    assert np.isfinite([good, bad, noisy]).all()
    assert good > bad
    assert good > noisy


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    f, y = blobs(n_per_class=20, separation=3.0, seed=4)
    assert SCORERS[name](f, y) == SCORERS[name](f, y)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_value_error(name):
    score = SCORERS[name]
    f, y = blobs(n_per_class=10)
    with pytest.raises(ValueError, match="labels"):
        score(f, y[:-1])  # mismatched lengths
    with pytest.raises(ValueError, match="2 classes"):
        score(f, np.zeros_like(y))
    bad = f.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        score(bad, y)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        score(bad, y)
    with pytest.raises(ValueError, match="N x D"):
        score(f[:, 0], y)


def _class_mean_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    for c in np.unique(y):
        g[y == c] = x[y == c].mean(axis=0)
    return g


@pytest.mark.timeout(60)
def test_hscore_without_shrinkage_is_the_textbook_formula():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(60, 3)) @ np.array([[2.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.1, 0.0, 0.7]]) + 5.0
    y = np.tile(np.arange(3), 20)
    f[y == 1] += np.array([1.0, -0.5, 0.2])
    # Bao et al.: tr(cov(f)^-1 cov(g)), g_i = E[f | y_i], both covariances with np.cov's N - 1
    g = _class_mean_matrix(f, y)
    expected = np.trace(np.linalg.inv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False))
    assert hscore(f, y, shrinkage=False) == pytest.approx(expected, rel=1e-10)


@pytest.mark.timeout(60)
def test_regularised_hscore_matches_ibrahim_et_al_with_sklearn_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(8)
    for n, d in [(80, 10), (40, 120)]:  # D < N and D > N
        f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        y = rng.integers(0, 4, size=n)
        x = f - f.mean(axis=0)
        lw = LedoitWolf(assume_centered=False).fit(x)
        covg = np.cov(_class_mean_matrix(x, y), rowvar=False, bias=True)  # 1/N, like Ledoit-Wolf's S
        expected = np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * covg))
        assert hscore(f, y) == pytest.approx(expected, rel=1e-8)


@pytest.mark.timeout(120)
def test_linear_probe_separable_and_chance():
    f, y = blobs(n_per_class=60, separation=12.0)
    assert linear_probe(f, y) >= 0.95
    rng = np.random.default_rng(5)
    y_noise = np.repeat(np.arange(4), 100)
    acc = linear_probe(rng.normal(size=(400, 20)), y_noise)
    assert 0.05 <= acc <= 0.5  # chance is 0.25


@pytest.mark.timeout(60)
def test_linear_probe_keeps_every_class_in_training():
    f, y = blobs(n_per_class=10, k=3)
    keep = np.concatenate([np.flatnonzero(y == 0)[:1], np.flatnonzero(y == 1)[:2], np.flatnonzero(y == 2)])
    acc = linear_probe(f[keep], y[keep], val_fraction=0.9)  # class 0 has one sample: train only
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="held-out"):
        linear_probe(f[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(f, y, val_fraction=1.0)


@pytest.mark.timeout(60)
def test_nleep_seed_and_options():
    f, y = blobs(n_per_class=20, d=80, separation=4.0)
    assert nleep(f, y, seed=3) == nleep(f, y, seed=3)
    # a LEEP score is a mean log-probability, hence never positive
    assert nleep(f, y, n_components=2, pca_dim=5) <= 0.0
    assert nleep(f * 1000.0, y) == pytest.approx(nleep(f, y), abs=1e-6)  # independent of the feature scale


@pytest.mark.timeout(60)
def test_logme_accepts_any_label_values():
    f, y = blobs(n_per_class=10)
    assert logme(f, y + 7) == pytest.approx(logme(f, y))


@pytest.mark.timeout(240)
def test_runtime_sanity_at_zoo_feature_size():
    # N=300 images, D=1280 (a MobileNetV2/EfficientNet-B0 penultimate layer), 10 classes
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(10), 30)
    f = rng.normal(size=(10, 1280))[y] * 0.5 + rng.normal(size=(300, 1280))
    for name in NAMES:
        assert np.isfinite(SCORERS[name](f, y)), name
