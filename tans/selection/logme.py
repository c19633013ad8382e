"""LogME: the log maximum evidence of a linear model on frozen features (You et al., ICML 2021).

"LogME: Practical Assessment of Pre-trained Models for Transfer Learning" scores how well a
pre-trained model's features ``F`` (``N x D``) suit a labelled target task without fine-tuning:
for each class ``c`` a Bayesian linear regression ``y_c = F w + noise`` with one-vs-rest targets
``y_c`` (1 for the class, 0 otherwise), prior ``w ~ N(0, I / alpha)`` and noise
``N(0, 1 / beta)``, has the log marginal evidence

    L(alpha, beta) = D/2 log alpha + N/2 log beta - N/2 log 2 pi
                     - beta/2 |y - F m|^2 - alpha/2 |m|^2 - 1/2 log |A|,
    A = alpha I + beta F^T F,   m = beta A^-1 F^T y,

maximised over ``(alpha, beta)`` by MacKay's fixed-point iteration
``gamma = sum_i beta s_i / (alpha + beta s_i)``, ``alpha = gamma / |m|^2``,
``beta = (N - gamma) / |y - F m|^2`` (``s_i``: eigenvalues of ``F^T F``). The score is the mean over
classes of ``L / N``; higher is better. Everything is computed from one thin SVD of ``F`` in
float64, so each class costs ``O(min(N, D))`` per iteration. With ``N < D``, ``F^T F`` has
``D - N`` zero eigenvalues: they add ``(D - N) log alpha`` to ``log |A|`` (the paper's reference
code leaves that term out when ``N < D``; this module keeps the exact evidence).

(The PyPI package ``logme`` is unrelated.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_ITER = 1000
TOL = 1e-10  # on |delta log alpha| and |delta log beta|
_REL_EPS = 1e-12  # keeps the updates finite when a residual or |m|^2 vanishes, without biasing them


@dataclass(frozen=True)
class EvidenceFit:
    """The maximised evidence of one target vector: ``evidence`` is ``L / N`` at ``(alpha, beta)``."""

    evidence: float
    alpha: float
    beta: float
    iterations: int


class _Spectrum:
    """``F``'s thin SVD, shared by every class: ``u`` (``N x k``) and ``sigma = s**2`` (``k``)."""

    def __init__(self, features: np.ndarray):
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be N x D, got shape {f.shape}")
        if f.shape[0] < 2 or f.shape[1] < 1:
            raise ValueError(f"LogME needs at least 2 samples and 1 feature, got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or infinite values")
        self.n, self.d = f.shape
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        self.u = u
        self.sigma = s * s


def _terms(spec: _Spectrum, x2: np.ndarray, res_x2: float, alpha: float, beta: float) -> tuple[float, float, float]:
    """``(gamma, |m|^2, |y - F m|^2)`` at ``(alpha, beta)``, in the SVD basis."""
    sigma = spec.sigma
    t = alpha / beta
    gamma = float(np.sum(sigma / (t + sigma)))
    m2 = float(np.sum(sigma * x2 / (t + sigma) ** 2))
    res2 = float(np.sum(x2 * (t / (t + sigma)) ** 2) + res_x2)
    return gamma, m2, res2


def _evidence(spec: _Spectrum, m2: float, res2: float, alpha: float, beta: float) -> float:
    n, d, k = spec.n, spec.d, spec.sigma.shape[0]
    log_det_a = float(np.sum(np.log(alpha + beta * spec.sigma))) + (d - k) * math.log(alpha)
    total = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
             - beta / 2 * res2 - alpha / 2 * m2 - log_det_a / 2)
    return total / n


def _fit(spec: _Spectrum, y: np.ndarray) -> EvidenceFit:
    x = spec.u.T @ y
    x2 = x * x
    yy = float(y @ y)
    res_x2 = max(yy - float(np.sum(x2)), 0.0)  # the part of y outside F's column space
    scale = max(yy, 1e-300)
    eps_res = _REL_EPS * scale
    eps_m = _REL_EPS * scale / max(float(spec.sigma.max(initial=0.0)), 1e-300)
    alpha, beta = 1.0, 1.0
    iterations = 0
    for iterations in range(1, MAX_ITER + 1):  # noqa: B007 (the count is returned)
        gamma, m2, res2 = _terms(spec, x2, res_x2, alpha, beta)
        new_alpha = max(gamma, 1e-300) / (m2 + eps_m)
        new_beta = max(spec.n - gamma, 1e-300) / (res2 + eps_res)
        done = abs(math.log(new_alpha / alpha)) < TOL and abs(math.log(new_beta / beta)) < TOL
        alpha, beta = new_alpha, new_beta
        if done:
            break
    _, m2, res2 = _terms(spec, x2, res_x2, alpha, beta)
    return EvidenceFit(evidence=_evidence(spec, m2, res2, alpha, beta), alpha=alpha, beta=beta, iterations=iterations)


def fit_evidence(features: np.ndarray, y: np.ndarray) -> EvidenceFit:
    """Maximise the evidence of ``y = F w + noise`` over ``(alpha, beta)`` for one real target ``y``."""
    spec = _Spectrum(features)
    target = np.asarray(y, dtype=np.float64).reshape(-1)
    if target.shape[0] != spec.n:
        raise ValueError(f"{spec.n} feature rows but {target.shape[0]} targets")
    return _fit(spec, target)


def log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """``L(alpha, beta) / N`` for one target ``y`` (the quantity :func:`fit_evidence` maximises)."""
    spec = _Spectrum(features)
    target = np.asarray(y, dtype=np.float64).reshape(-1)
    x2 = (spec.u.T @ target) ** 2
    res_x2 = max(float(target @ target) - float(np.sum(x2)), 0.0)
    _, m2, res2 = _terms(spec, x2, res_x2, alpha, beta)
    return _evidence(spec, m2, res2, alpha, beta)


def logme_score(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (``N x D``) for integer ``labels`` (``N``): mean per-class ``L / N``.

    Classes are the distinct labels present (one-vs-rest 0/1 targets). Deterministic; float64
    internally. Higher means the features suit the labels better.
    """
    spec = _Spectrum(features)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != spec.n:
        raise ValueError(f"{spec.n} feature rows but {y.shape[0]} labels")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
    scores = [_fit(spec, (y == c).astype(np.float64)).evidence for c in np.unique(y)]
    return float(np.mean(scores))
