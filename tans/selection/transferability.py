"""Transferability scores: how well a frozen model's features suit a labelled target task.

Each scorer takes the features ``F`` (``N x D`` floats, one row per target image, extracted by a
pretrained zoo model without fine-tuning) and the integer labels ``y`` (``N``) and returns one float;
higher means the model should transfer better. They are the baselines of the model-selection
protocol (:mod:`tans.selection.metrics`): each ranks the zoo for a task, to be compared with TANS's
retrieval and with the ground-truth fine-tuned accuracies.

* ``logme``: LogME (You et al., ICML 2021), see :mod:`tans.selection.logme`;
* ``hscore``: H-score (Bao et al., ICIP 2019), by default regularised with Ledoit-Wolf shrinkage
  (Ibrahim et al., ICLR 2022), which keeps it meaningful when ``D`` is close to or above ``N``;
* ``nleep``: N-LEEP (Li et al., CVPR 2021), LEEP with a Gaussian mixture on the features in place of
  the source classifier's head;
* ``linear_probe``: held-out accuracy of a logistic regression on the features (the direct, most
  expensive proxy).

All are deterministic pure functions (seeded where randomness is involved), validate their input the
same way (``ValueError`` with one line), and stay silent on ordinary inputs. numpy, plus
scikit-learn for the mixture model and the logistic regression.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from tans.selection.logme import logme_score

NLEEP_MAX_DIM = 64


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(F as float64 N x D, labels as codes 0..K-1, K)``, or ``ValueError`` for unusable input."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or f.shape[1] < 1:
        raise ValueError(f"features must be N x D with D >= 1, got shape {f.shape}")
    if f.shape[0] != y.shape[0]:
        raise ValueError(f"{f.shape[0]} feature rows but {y.shape[0]} labels")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    classes, codes = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"need at least 2 classes, got {classes.size}")
    return f, codes.reshape(-1), int(classes.size)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021).

    :func:`tans.selection.logme.logme_score` with this module's input checks (2+ classes, finite features).
    """
    f, codes, _ = _check(features, labels)
    return logme_score(f, codes)


def _ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity of the covariance of the *centred* rows of ``x``.

    The same estimator as ``sklearn.covariance.ledoit_wolf_shrinkage(x, assume_centered=True)``
    (Ledoit & Wolf 2004, target ``mu I`` with ``mu = tr(S) / D``), but with its two ``D x D`` sums
    rewritten through the ``N x N`` Gram matrix: ``sum((X^T X)^2) = sum((X X^T)^2)`` and
    ``sum((X^2)^T X^2) = sum_i |x_i|^4``, so the cost is ``O(N^2 D)`` instead of ``O(N D^2)``.
    """
    n, d = x.shape
    row_sq = np.einsum("ij,ij->i", x, x)
    gram = x @ x.T
    trace_s = row_sq.sum() / n
    mu = trace_s / d
    delta_ = float(np.sum(gram * gram)) / n**2  # |S|_F^2
    beta_ = float(np.sum(row_sq**2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace_s + d * mu**2) / d  # |S - mu I|_F^2 / D
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def hscore(features: np.ndarray, labels: np.ndarray, shrinkage: bool = True) -> float:
    """H-score: ``tr(cov(F)^+ cov(E[F | y]))`` (Bao et al., "An Information-Theoretic Approach to
    Transferability in Task Transfer Learning", ICIP 2019).

    With ``shrinkage`` (default) the regularised H-score of Ibrahim, Ponomareva & Mazumder ("Newer is
    not always better: Rethinking transferability metrics, their peculiarities, stability and
    performance", ICLR 2022): ``cov(F)`` is replaced by the Ledoit-Wolf estimate
    ``(1 - a) S + a (tr(S) / D) I`` and ``cov(E[F | y])`` is scaled by ``(1 - a)``, as in their code.
    Without it, the textbook formula with both covariances normalised by ``N - 1`` (``np.cov``) and
    the Moore-Penrose pseudo-inverse (``rcond = 1e-15``, as ``np.linalg.pinv``).

    Computed in the row space of the centred features: every class mean lies there, so only the
    eigenpairs of ``S`` from a thin SVD of ``F`` (``min(N, D)`` of them) are needed.
    """
    f, codes, k = _check(features, labels)
    n, d = f.shape
    x = f - f.mean(axis=0, keepdims=True)
    # sum_c (n_c / N) mu_c^T C^+ mu_c == tr(C^+ cov(g)) with g_i the class mean of sample i
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    means = np.zeros((k, d))
    np.add.at(means, codes, x)
    means /= counts[:, None]
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    if shrinkage:
        # Ledoit-Wolf works with the maximum-likelihood covariance (1/N); use the same for cov(g)
        a = _ledoit_wolf_shrinkage(x)
        eig = (1.0 - a) * s**2 / n + a * float(np.sum(s**2)) / (n * d)
        weights, between_scale = counts / n, 1.0 - a
    else:
        eig = s**2 / (n - 1)
        weights, between_scale = counts / (n - 1), 1.0
    keep = eig > 1e-15 * eig.max(initial=0.0)  # pinv's cut-off on the singular values of C
    if not keep.any():
        return 0.0
    proj = means @ vt[keep].T  # class means in the eigenbasis, k x r
    quad = np.sum(proj**2 / eig[keep], axis=1)
    return float(between_scale * np.sum(weights * quad))


def _pca(x: np.ndarray, dim: int) -> np.ndarray:
    """The centred ``x`` projected on its first ``dim`` principal axes (signs fixed: deterministic)."""
    x = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    dim = min(dim, s.size)
    # SVD signs are arbitrary; fix each axis so its largest-magnitude loading is positive
    signs = np.sign(vt[np.arange(dim), np.argmax(np.abs(vt[:dim]), axis=1)])
    signs[signs == 0] = 1.0
    return u[:, :dim] * (s[:dim] * signs)


def nleep(
    features: np.ndarray, labels: np.ndarray, n_components: int | None = None, seed: int = 0, pca_dim: int = 0
) -> float:
    """N-LEEP (Li et al., "Ranking Neural Checkpoints", CVPR 2021): LEEP on a Gaussian mixture.

    LEEP (Nguyen et al., ICML 2020) scores ``mean_i log sum_z P(y_i | z) P(z | x_i)`` where ``P(z | x)``
    is a source model's class posterior and ``P(y | z)`` the empirical conditional of target labels
    given source "classes". N-LEEP takes ``P(z | x)`` from a diagonal Gaussian mixture fitted to the
    (PCA-reduced) features instead, which needs no source head. ``pca_dim`` 0 means ``min(D, 64)``;
    ``n_components`` defaults to 5 per class, capped at ``N // 2``. Deterministic for a given ``seed``.
    """
    f, codes, k = _check(features, labels)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"N-LEEP needs at least 2 samples, got {n}")
    dim = pca_dim if pca_dim > 0 else min(d, NLEEP_MAX_DIM)
    z = _pca(f, min(dim, d))
    # reg_covar is absolute: put the features on unit average variance so it regularises equally
    # whatever the model's feature scale (a global scalar keeps the geometry, hence the score's meaning)
    scale = math.sqrt(float(np.mean(z.var(axis=0))))
    z = z / scale if scale > 0 else z
    comps = n_components if n_components is not None else 5 * k
    comps = max(1, min(int(comps), n // 2))

    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(n_components=comps, covariance_type="diag", random_state=seed, reg_covar=1e-4)
        post = gmm.fit(z).predict_proba(z)  # P(z | x_i), N x comps
    joint = np.zeros((k, comps))
    np.add.at(joint, codes, post)
    joint /= n  # P(y, z)
    p_z = joint.sum(axis=0)
    cond = joint / np.maximum(p_z, 1e-300)  # P(y | z); a component with no mass contributes 0
    eep = np.sum(post * cond[codes], axis=1)  # sum_z P(y_i | z) P(z | x_i)
    return float(np.mean(np.log(np.clip(eep, 1e-300, 1.0))))  # a probability: clip rounding above 1


def _stratified_split(codes: np.ndarray, k: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; every class keeps at least one training sample."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(codes == c))
        n_val = min(int(round(val_fraction * idx.size)), idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def linear_probe(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, val_fraction: float = 0.3, l2: float = 1e-3,
    steps: int = 200,
) -> float:
    """Held-out accuracy of a multinomial logistic regression on frozen features (the "linear probe"
    of e.g. Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019).

    A seeded stratified ``val_fraction`` of each class is held out (every class keeps at least one
    training sample); features are standardised with the training part's mean and std; the model
    minimises ``mean cross-entropy + l2 / 2 |W|^2`` with L-BFGS for at most ``steps`` iterations
    (scikit-learn's ``LogisticRegression``, deterministic). Returns accuracy in ``[0, 1]``.
    """
    f, codes, k = _check(features, labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if l2 <= 0 or steps < 1:
        raise ValueError(f"l2 must be > 0 and steps >= 1, got l2={l2}, steps={steps}")
    train, val = _stratified_split(codes, k, val_fraction, seed)
    if val.size == 0:
        raise ValueError(f"too few samples per class ({f.shape[0]} for {k} classes) for a held-out split")
    mean = f[train].mean(axis=0)
    std = f[train].std(axis=0)
    std[std < 1e-12] = 1.0  # a constant feature carries nothing; keep it at 0 rather than divide by 0
    x_train, x_val = (f[train] - mean) / std, (f[val] - mean) / std

    from sklearn.linear_model import LogisticRegression

    # sklearn minimises C * sum CE + |W|^2 / 2, i.e. mean CE + |W|^2 / (2 C n): C = 1 / (l2 n)
    model = LogisticRegression(C=1.0 / (l2 * train.size), max_iter=steps, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, codes[train])
    return float(np.mean(model.predict(x_val) == codes[val]))


SCORERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "logme": logme,
    "hscore": hscore,
    "nleep": nleep,
    "linear_probe": linear_probe,
}
