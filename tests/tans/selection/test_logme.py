"""LogME: the maximised evidence against a direct numpy formula, a grid search, and its ranking."""

from __future__ import annotations

import numpy as np
import pytest

from tans.selection.logme import fit_evidence, log_evidence, logme_score


def direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """``L(alpha, beta) / N`` written out with explicit matrices (no SVD), as in the paper."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    sign, log_det = np.linalg.slogdet(a)
    assert sign > 0
    total = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
             - beta / 2 * np.sum((y - f @ m) ** 2) - alpha / 2 * m @ m - log_det / 2)
    return total / n


def reference_fixed_point(f: np.ndarray, y: np.ndarray) -> float:
    """The authors' reference iteration (github.com/thuml/LogME, ``_fit_fixed_point``), for N >= D."""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = (s**2).reshape(-1, 1)
    x = u.T @ y.reshape(-1, 1)
    x2 = x**2
    res_x2 = (y**2).sum() - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(11):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum()
        m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
        res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n


def informative(n: int, d: int, seed: int, noise: float = 0.3, rank: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A 0/1 target and rank-``rank`` features that carry it plus noise.

    The rank stays below N, so even with N < D the features cannot interpolate the target and the
    evidence has an interior maximum (with N <= rank it may lie at beta -> infinity).
    """
    rng = np.random.default_rng(seed)
    y = np.zeros(n)
    y[: n // 2] = 1.0
    latent = np.c_[y + noise * rng.normal(size=n), rng.normal(size=(n, rank - 1))]
    return latent @ rng.normal(size=(rank, d)), y


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n, d", [(10, 4), (8, 12)])  # N >= D and N < D (D - N zero eigenvalues)
def test_converged_evidence_is_the_direct_formula_at_its_maximum(n, d):
    f, y = informative(n, d, seed=1)
    fit = fit_evidence(f, y)
    assert fit.iterations < 1000 and fit.alpha > 0 and fit.beta > 0
    assert fit.evidence == pytest.approx(direct_evidence(f, y, fit.alpha, fit.beta), rel=1e-10, abs=1e-12)
    assert log_evidence(f, y, fit.alpha, fit.beta) == pytest.approx(fit.evidence, rel=1e-12)
    # A brute-force grid over (log alpha, log beta) around the fixed point finds nothing higher,
    # and its best cell is the fixed point itself.
    steps = np.linspace(-2.0, 2.0, 41)
    grid = np.array([[direct_evidence(f, y, fit.alpha * np.exp(i), fit.beta * np.exp(j)) for j in steps]
                     for i in steps])
    assert grid.max() <= fit.evidence + 1e-12
    assert np.unravel_index(grid.argmax(), grid.shape) == (20, 20)
    assert grid[20, 20] - grid[19, 20] > 1e-6 and grid[20, 20] - grid[20, 21] > 1e-6  # a strict maximum
    # The stationarity conditions, with gamma, m and the residual computed directly.
    a = fit.alpha * np.eye(d) + fit.beta * f.T @ f
    m = fit.beta * np.linalg.solve(a, f.T @ y)
    eig = np.linalg.eigvalsh(f.T @ f)
    gamma = np.sum(fit.beta * eig / (fit.alpha + fit.beta * eig))
    assert fit.alpha == pytest.approx(gamma / (m @ m), rel=1e-6)
    assert fit.beta == pytest.approx((n - gamma) / np.sum((y - f @ m) ** 2), rel=1e-6)


@pytest.mark.timeout(30)
def test_score_is_the_mean_per_class_evidence_and_agrees_with_the_reference():
    rng = np.random.default_rng(3)
    labels = np.arange(40) % 4
    f = rng.normal(size=(40, 6))
    f[:, :4] += 1.5 * np.eye(4)[labels]
    per_class = [fit_evidence(f, (labels == c).astype(float)) for c in range(4)]
    score = logme_score(f, labels)
    assert score == pytest.approx(np.mean([direct_evidence(f, (labels == c).astype(float), p.alpha, p.beta)
                                           for c, p in enumerate(per_class)]), rel=1e-10)
    # N >= D: the authors' reference iteration (11 steps, 1e-3 tolerance) lands on the same value.
    ref = np.mean([reference_fixed_point(f, (labels == c).astype(float)) for c in range(4)])
    assert score == pytest.approx(ref, abs=1e-3)
    # Deterministic; invariant to class names, sample order and float32 input.
    assert logme_score(f, labels) == score
    assert logme_score(f, (labels + 1) * 7) == pytest.approx(score, rel=1e-12)
    order = rng.permutation(40)
    assert logme_score(f[order], labels[order]) == pytest.approx(score, rel=1e-9)
    f32 = f.astype(np.float32)
    assert logme_score(f32, labels) == logme_score(f32.astype(np.float64), labels)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n, d", [(60, 16), (24, 64)])
def test_features_that_separate_the_classes_score_higher(n, d):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(n) % 4)
    base = rng.normal(size=(n, d))
    signal = np.zeros((n, d))
    signal[:, :4] = 3.0 * np.eye(4)[labels]
    scores = [logme_score(base + signal * strength, labels) for strength in (1.0, 0.6)]
    random_score = logme_score(rng.normal(size=(n, d)), labels)
    assert scores[0] > scores[1] > random_score and scores[0] > random_score + 0.08, scores + [random_score]
    # The same features against shuffled labels lose their advantage.
    assert logme_score(base + signal, rng.permutation(labels)) < scores[0] - 0.05


@pytest.mark.timeout(30)
def test_bad_inputs_are_value_errors():
    f = np.random.default_rng(0).normal(size=(6, 3))
    for features, labels in [
        (f, np.arange(5)),  # lengths differ
        (f[:, 0], np.arange(6)),  # not N x D
        (f[:1], np.arange(1)),  # one sample
        (np.where(np.eye(6, 3) > 0, np.nan, f), np.arange(6)),  # NaN
        (f, np.linspace(0, 1, 6)),  # not integer labels
    ]:
        with pytest.raises(ValueError):
            logme_score(features, labels)
    assert logme_score(f, np.arange(6).astype(float) % 2) == logme_score(f, np.arange(6) % 2)  # 0.0/1.0 are integers
