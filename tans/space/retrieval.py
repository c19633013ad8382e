"""Constrained retrieval from the cross-modal space: mask the zoo, top-k by cosine, re-rank.

The index is a plain N x D tensor of unit model embeddings; a query is encoded once, scored
against every row with one matrix-vector product, rows that break a constraint are set to -inf,
and ``torch.topk`` picks the k best. No Python loop touches the rows, so a 1,000,000-row index
costs about one matmul. Loading a Retriever from a storage root lives elsewhere; the constructor
takes arrays so such a loader stays a few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tans.space.encoders import PerformancePredictor, QueryEncoder, SpaceError
from tans.space.prior import DEFAULT_PRIOR_WEIGHT, row_prior, task_codes, zoo_task_means
from tans.space.store import space_root_uri
from tans.storage import Storage

if TYPE_CHECKING:
    from tans.space.features import FeatureExtractor


class UnsatisfiableConstraint(SpaceError):
    """No model of the index satisfies the constraints."""


def constraint_mask(n_params, flops, families=None, max_params=None, max_flops=None, family=None):
    """Boolean mask of rows with n_params <= max_params, flops <= max_flops and family == family.

    ``n_params``/``flops`` are 1-D numpy arrays or torch tensors (the mask has the same kind);
    ``families`` is a sequence of family names, required only when ``family`` is given. A limit
    of None means no limit.
    """
    is_torch = isinstance(n_params, torch.Tensor)
    n_np = n_params.cpu().numpy() if is_torch else np.asarray(n_params)
    f_np = flops.cpu().numpy() if isinstance(flops, torch.Tensor) else np.asarray(flops)
    if n_np.shape != f_np.shape:
        raise SpaceError(f"n_params has shape {n_np.shape} but flops has {f_np.shape}")
    mask = np.ones(n_np.shape, dtype=bool)
    if max_params is not None:
        mask &= n_np <= max_params
    if max_flops is not None:
        mask &= f_np <= max_flops
    if family is not None:
        if families is None:
            raise SpaceError("a family constraint needs the index's family column")
        mask &= np.asarray(families) == family
    return torch.from_numpy(mask).to(n_params.device) if is_torch else mask


def topk_cosine(query_emb: torch.Tensor, index_emb: torch.Tensor, k: int, mask: torch.Tensor | None = None):
    """Top-k rows of ``index_emb`` (N x D unit rows) by cosine similarity to ``query_emb`` (D,).

    Rows where ``mask`` is False are excluded; if fewer than k rows survive, all survivors are
    returned. Returns (indices, similarities), both 1-D tensors sorted by decreasing similarity.
    """
    if k <= 0:
        raise SpaceError(f"k must be >= 1, got {k}")
    sims = index_emb @ query_emb.to(index_emb.dtype)
    if mask is not None:
        mask = torch.as_tensor(mask, device=sims.device)
        # -inf, not a large negative: a masked row can then never outrank a surviving one
        sims = sims.masked_fill(~mask, float("-inf"))
        k = min(k, int(mask.sum()))
    k = min(k, sims.shape[0])
    if k == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=sims.dtype)
    values, indices = torch.topk(sims, k)
    return indices, values


def standardise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` minus their mean, over their standard deviation, both taken over the rows where
    ``mask`` is True (a constant column gives zeros, never a division by zero)."""
    kept = values[mask]
    if kept.numel() == 0:
        return torch.zeros_like(values)
    sd = kept.std(unbiased=False)
    return (values - kept.mean()) / (sd if float(sd) > 0 else 1.0)


def blend_with_prior(space_scores: torch.Tensor, prior, weight: float, mask: torch.Tensor) -> torch.Tensor:
    """``z(space_scores) + weight * z(prior)``, both standardised over the rows ``mask`` keeps.

    The two scores live on unrelated scales (a cosine, a rank-based nearest-dataset score), so
    each is standardised over the candidates before they are added; ``weight`` 0 ranks exactly
    as ``space_scores`` do.
    """
    prior = torch.as_tensor(np.asarray(prior, dtype=np.float64), dtype=space_scores.dtype)
    if prior.shape != space_scores.shape:
        raise SpaceError(f"the prior has {tuple(prior.shape)} values but the index {tuple(space_scores.shape)} rows")
    return standardise(space_scores, mask) + float(weight) * standardise(prior, mask)


@dataclass
class Candidate:
    """One retrieved model."""

    model_id: str
    task: str
    similarity: float
    predicted_accuracy: float
    n_params: int
    flops: int


@dataclass
class RetrievalResult:
    """The candidates (best first), how many were asked for and returned, and a note if fewer."""

    candidates: list[Candidate]
    requested_k: int
    returned_k: int
    note: str = ""
    constraints: dict = field(default_factory=dict)
    prior_weight: float = 0.0  # the weight the nearest-dataset prior was blended with (0: the space alone)


class Retriever:
    """An in-memory index of model embeddings plus the query encoder and predictor.

    Arrays are row-aligned: ``model_ids``, ``tasks``, ``families`` (strings), ``n_params``,
    ``flops`` (ints), ``embeddings`` (N x D unit vectors from the ModelEncoder).
    ``query_encoder`` maps (features, labels) to a query embedding: a :class:`QueryEncoder`, or a
    stand-in module (the server passes one whose "features" are an already computed embedding).
    ``task_means`` (zoo task -> mean query feature, :mod:`tans.space.prior`) is read from the
    space's storage on first use when not given.
    """

    def __init__(
        self,
        model_ids: Sequence[str] | np.ndarray,
        tasks: Sequence[str] | np.ndarray,
        n_params,
        flops,
        families: Sequence[str] | np.ndarray,
        embeddings,
        query_encoder: QueryEncoder | nn.Module,
        predictor: PerformancePredictor,
        info: dict | None = None,
        extractor_spec=None,
        index_table=None,
        task_means: dict[str, np.ndarray] | None = None,
    ):
        self.model_ids = np.asarray(model_ids, dtype=object)
        self.tasks = np.asarray(tasks, dtype=object)
        self.n_params = np.asarray(n_params, dtype=np.int64)
        self.flops = np.asarray(flops, dtype=np.int64)
        self.families = np.asarray(families, dtype=object)
        self.embeddings = torch.as_tensor(np.array(embeddings, dtype=np.float32))
        n = len(self.model_ids)
        lengths = {len(a) for a in (self.tasks, self.n_params, self.flops, self.families, self.embeddings)}
        if lengths != {n}:
            raise SpaceError(f"index columns have different lengths: {sorted(lengths | {n})}")
        if n == 0:
            raise SpaceError("the index is empty; build the space from a non-empty zoo")
        self.query_encoder = query_encoder.eval()
        self.predictor = predictor.eval()
        self.info = dict(info or {})  # space.json plus `run` and `uri` when loaded from storage
        self.extractor_spec = extractor_spec  # how queries are made from images (tans.space.features)
        self.index_table = index_table  # the index's Arrow table (zoo columns), when loaded
        self._extractor: FeatureExtractor | None = None
        self._task_means = task_means
        self._prior_rows: tuple[tuple[np.ndarray, np.ndarray], np.ndarray] | None = None

    @classmethod
    def load(cls, space_uri: str | None = None) -> Retriever:
        """The space at ``space_uri``: ``<root>/spaces/<run>``, a root (its LATEST) or a run name."""
        from tans.space.store import load_space

        return load_space(space_uri)

    @property
    def extractor(self) -> FeatureExtractor:
        """The space's frozen feature extractor (built on first use)."""
        if self._extractor is None:
            if self.extractor_spec is None:
                raise SpaceError("this retriever has no feature extractor; pass query features instead of images")
            from tans.space.features import build_extractor

            self._extractor = build_extractor(self.extractor_spec)
        return self._extractor

    def encode_images(self, images) -> torch.Tensor:
        """uint8 images ``N x C x H x W`` -> query features with the space's extractor."""
        return self.extractor(torch.as_tensor(images))

    @property
    def task_means(self) -> dict[str, np.ndarray]:
        """Mean query feature of every zoo task with a stored query, read once from the storage
        root the space lives in ({} for a space built in memory, or one whose tasks have no query)."""
        if self._task_means is None:
            root = space_root_uri(str(self.info.get("uri", "")))
            if root is not None and "extractor" in self.info:
                self._task_means = zoo_task_means(Storage(root), self.info)
            else:
                self._task_means = {}
        return self._task_means

    def nearest_prior(self, query_features) -> np.ndarray | None:
        """The nearest-dataset prior of every index row for a query's extractor features
        (:func:`tans.space.prior.row_prior`); None when no zoo task has a stored query."""
        features = torch.as_tensor(query_features, dtype=torch.float32)
        if features.ndim != 2:
            raise SpaceError(f"query features must be 2-D (n_images x feature_dim), got shape {tuple(features.shape)}")
        if self._prior_rows is None:  # per index, once: the rows' task codes and zoo accuracies
            accuracy = (self.index_table.column("accuracy").to_numpy() if self.index_table is not None
                        and "accuracy" in self.index_table.column_names else np.zeros(len(self)))
            self._prior_rows = (task_codes(self.tasks), np.asarray(accuracy, dtype=np.float64))
        codes, accuracy = self._prior_rows
        return row_prior(features.mean(0).numpy(), self.task_means, self.tasks, accuracy, codes=codes)

    def retrieve_images(self, images, labels, prior_weight: float = DEFAULT_PRIOR_WEIGHT, **kwargs) -> RetrievalResult:
        """:meth:`retrieve` for raw images (uint8 ``N x C x H x W``) and their labels, ranked as
        ``tans search`` ranks: the predictor's score blended with the nearest-dataset prior at
        ``prior_weight`` (0, or a space whose zoo tasks have no stored query: the space alone)."""
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != len(images):
            raise SpaceError(f"{len(images)} images but {labels.numel()} labels")
        if torch.unique(labels).numel() < 2:
            raise SpaceError(f"a query needs at least 2 classes, got {torch.unique(labels).numel()}")
        features = self.encode_images(images)
        prior = self.nearest_prior(features) if prior_weight > 0 else None
        return self.retrieve(features, labels, prior=prior, prior_weight=prior_weight, **kwargs)

    def row_of(self, model_id: str) -> int | None:
        """Index row of ``model_id`` (None if it is not in the index)."""
        if not hasattr(self, "_rows"):
            self._rows = {m: i for i, m in enumerate(self.model_ids)}
        return self._rows.get(model_id)

    def __len__(self) -> int:
        return len(self.model_ids)

    def smallest_model(self) -> int:
        """Row of the smallest model (fewest params, then fewest flops)."""
        return int(np.lexsort((self.flops, self.n_params))[0])

    @torch.no_grad()
    def score_rows(self, query_features, query_labels, rows) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity, predicted accuracy) of the query against each of ``rows``.

        The two numbers :meth:`retrieve` ranks by, for every given row rather than the top k.
        """
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        q = self.query_encoder(torch.as_tensor(query_features), torch.as_tensor(query_labels))
        emb = self.embeddings[rows]
        sims = emb @ q.reshape(-1).to(emb.dtype)
        pred = self.predictor(q[None], emb).reshape(-1)
        return sims.numpy().astype(np.float64), pred.numpy().astype(np.float64)

    @torch.no_grad()
    def retrieve(
        self,
        query_features,
        query_labels,
        k: int = 10,
        max_params: int | None = None,
        max_flops: int | None = None,
        family: str | None = None,
        rerank: bool = True,
        rows=None,
        prior=None,
        prior_weight: float = 0.0,
    ) -> RetrievalResult:
        """Encode the query, mask by the constraints, take the top-k by cosine, re-rank by predictor.

        ``rows`` (optional index rows) restricts the choice to those models, e.g. an evaluation
        pool. ``prior`` (one score per index row, higher = better, e.g. :meth:`nearest_prior`) with
        ``prior_weight`` > 0 ranks instead by :func:`blend_with_prior` of the predictor's score and
        the prior, over the rows that satisfy everything; that blend replaces the cosine top-k and
        the re-ranking. Raises
        SpaceError for k <= 0 or a bad query, UnsatisfiableConstraint if no model fits.
        """
        if k <= 0:
            raise SpaceError(f"k must be >= 1, got {k}")
        constraints = {"max_params": max_params, "max_flops": max_flops, "family": family}
        mask = constraint_mask(self.n_params, self.flops, self.families, max_params, max_flops, family)
        if rows is not None:
            allowed = np.zeros(len(self), dtype=bool)
            allowed[np.asarray(rows, dtype=np.int64)] = True
            mask &= allowed
        survivors = int(mask.sum())
        if survivors == 0:
            i = self.smallest_model()
            raise UnsatisfiableConstraint(
                f"no model satisfies {', '.join(f'{k_}={v}' for k_, v in constraints.items() if v is not None)}; "
                f"the smallest model available is {self.model_ids[i]} (family {self.families[i]}, "
                f"n_params={self.n_params[i]}, flops={self.flops[i]}): relax the constraint"
            )
        q = self.query_encoder(torch.as_tensor(query_features), torch.as_tensor(query_labels))
        mask_t = torch.from_numpy(mask)
        blended = prior is not None and prior_weight > 0
        if blended:
            # the predictor's score of every row, not the cosine: chosen on validation (README "Evaluation")
            predicted = self.predictor(q[None], self.embeddings).reshape(-1)
            ranking = blend_with_prior(predicted, prior, prior_weight, mask_t).masked_fill(~mask_t, float("-inf"))
            idx = torch.topk(ranking, min(k, survivors)).indices
            sims = (self.embeddings @ q.to(self.embeddings.dtype))[idx]
            rerank = False  # the blend is the ranking
        else:
            idx, sims = topk_cosine(q, self.embeddings, k, mask_t)
        pred = self.predictor(q[None], self.embeddings[idx]).reshape(-1)
        order = torch.argsort(pred, descending=True, stable=True) if rerank else torch.arange(len(idx))
        candidates = [
            Candidate(
                model_id=str(self.model_ids[j]),
                task=str(self.tasks[j]),
                similarity=float(sims[o]),
                predicted_accuracy=float(pred[o]),
                n_params=int(self.n_params[j]),
                flops=int(self.flops[j]),
            )
            for o in order.tolist()
            for j in [int(idx[o])]
        ]
        note = ""
        if len(candidates) < k:
            note = (f"asked for {k} models but only {len(candidates)} of {len(self)} satisfy the constraints; "
                    "returning those")
        return RetrievalResult(candidates, requested_k=k, returned_k=len(candidates), note=note,
                               constraints=constraints, prior_weight=float(prior_weight) if blended else 0.0)
