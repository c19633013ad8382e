"""Training the cross-modal space on a zoo: the step, the validation and the model index.

Used by ``jobs/train_space.py`` (inside Ray Train workers) and by the tests; no ``import ray``.

One training step takes a batch of meta-train tasks. Each task's query is a fresh random
subsample (``per_class`` images per class) of its stored query features, so the encoder never
sees the same query twice. The task's most accurate zoo model is its positive; the batch's other
tasks' models are negatives, and its own weaker models are extra negatives (its best model must
beat them by the margin too). The predictor learns the measured accuracy of every model of the
batch's tasks paired with that task's query.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from tans.space.contrastive import MARGIN, predictor_loss, space_loss
from tans.space.encoders import ModelEncoder, PerformancePredictor, QueryEncoder, SpaceError, class_means
from tans.space.metrics import space_metrics
from tans.space.transfer import TransferPairs


@dataclass
class ZooArrays:
    """The zoo table as row-aligned arrays (what the model encoder and metrics need)."""

    model_ids: np.ndarray
    tasks: np.ndarray
    families: np.ndarray
    ks: torch.Tensor
    e: torch.Tensor
    d: torch.Tensor
    f_emb: torch.Tensor
    accuracy: torch.Tensor
    n_params: np.ndarray
    flops: np.ndarray
    # N x feature_dim: the mean query feature of each row's zoo task (zeros for a task without a
    # stored query); only for a space whose model encoder takes task features
    task_feat: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.model_ids)

    def with_task_features(self, queries: dict[str, tuple[np.ndarray, np.ndarray]]) -> ZooArrays:
        """A copy whose ``task_feat`` holds each row's task's mean query feature (``queries``:
        task -> (features, labels), e.g. :func:`tans.space.features.read_query` of every task)."""
        dim = next(iter(queries.values()))[0].shape[1]
        means = {t: torch.as_tensor(x.mean(axis=0), dtype=torch.float32) for t, (x, _) in queries.items()}
        zero = torch.zeros(dim)
        feat = torch.stack([means.get(t, zero) for t in self.tasks]) if len(self) else torch.zeros(0, dim)
        return replace(self, task_feat=feat)

    def subset(self, rows: np.ndarray) -> ZooArrays:
        """The arrays of ``rows`` only."""
        r = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return ZooArrays(self.model_ids[rows], self.tasks[rows], self.families[rows], self.ks[r], self.e[r],
                         self.d[r], self.f_emb[r], self.accuracy[r], self.n_params[rows], self.flops[rows],
                         None if self.task_feat is None else self.task_feat[r])

    @classmethod
    def from_table(cls, table: pa.Table) -> ZooArrays:
        def ints(name):
            return torch.tensor(table.column(name).to_pylist(), dtype=torch.long)

        return cls(
            model_ids=np.asarray(table.column("model_id").to_pylist(), dtype=object),
            tasks=np.asarray(table.column("task").to_pylist(), dtype=object),
            families=np.asarray(table.column("family").to_pylist(), dtype=object),
            ks=ints("ks"), e=ints("e"), d=ints("d"),
            f_emb=torch.tensor(np.asarray(table.column("f_emb").to_pylist(), dtype=np.float32)),
            accuracy=torch.tensor(table.column("accuracy").to_pylist(), dtype=torch.float32),
            n_params=np.asarray(table.column("n_params").to_pylist(), dtype=np.int64),
            flops=np.asarray(table.column("flops").to_pylist(), dtype=np.int64),
        )

    def rows_of(self, tasks) -> np.ndarray:
        return np.flatnonzero(np.isin(self.tasks, list(tasks)))


class SpaceModel(nn.Module):
    """The three networks as one module, so DDP sees one forward and one state dict."""

    def __init__(self, family, feature_dim: int, embed_dim: int = 128, hidden: int = 256,
                 attention: bool = False, predictor_hidden: int = 128, task_features: bool = False):
        super().__init__()
        self.query_encoder = QueryEncoder(feature_dim, embed_dim, hidden, attention)
        self.model_encoder = ModelEncoder(family, embed_dim, hidden, task_dim=feature_dim if task_features else 0)
        self.predictor = PerformancePredictor(embed_dim, predictor_hidden)

    def forward(self, means, mask, ks, e, d, f_emb, query_of_row, task_feat=None):
        """Padded class means (B x C x F) + zoo rows -> (query emb B x D, model emb R x D, predicted R)."""
        q = self.query_encoder.encode_means(means, mask)
        m = self.model_encoder(ks, e, d, f_emb, task_feat)
        return q, m, self.predictor(q[query_of_row], m)


def _unwrap(model: nn.Module) -> SpaceModel:
    """The SpaceModel inside a DDP (or similar) wrapper; the model itself otherwise."""
    return cast(SpaceModel, getattr(model, "module", model))


def subsample_query(features: np.ndarray, labels: np.ndarray, per_class: int, gen: np.random.Generator):
    """A random ``per_class`` images of each class of a stored query (all of a smaller class)."""
    rows = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rows.append(gen.choice(idx, size=min(per_class, idx.size), replace=False))
    picked = np.concatenate(rows)
    return features[picked], labels[picked]


def pad_means(queries: list[tuple[np.ndarray, np.ndarray]], feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means of each query, padded to the largest class count, with the mask of real classes."""
    means = [class_means(torch.as_tensor(x), torch.as_tensor(y), feature_dim) for x, y in queries]
    c_max = max(m.shape[0] for m in means)
    padded = torch.zeros(len(means), c_max, feature_dim)
    mask = torch.zeros(len(means), c_max, dtype=torch.bool)
    for i, m in enumerate(means):
        padded[i, : m.shape[0]] = m
        mask[i, : m.shape[0]] = True
    return padded, mask


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, zoo: ZooArrays,
               queries: dict[str, tuple[np.ndarray, np.ndarray]], tasks: list[str], per_class: int,
               gen: np.random.Generator, lam: float = 1.0, margin: float = MARGIN,
               feature_dim: int | None = None, device: str | torch.device = "cpu",
               transfer: TransferPairs | None = None, transfer_weight: float = 1.0) -> dict[str, float]:
    """One optimisation step on ``tasks`` (each must have >= 1 zoo row and a stored query).

    ``transfer``: predictor pairs from ground-truth fine-tunes on other tasks (rows of ``zoo``; each
    of ``transfer.tasks`` needs a query in ``queries``), added to the loss as ``transfer_weight`` x
    their MSE. They share the step's one forward pass (one DDP forward per backward).
    """
    if len(tasks) < 2:
        raise SpaceError("a training step needs at least 2 tasks (the others are its negatives)")
    inner = _unwrap(model)
    dim = feature_dim or inner.query_encoder.feature_dim
    pairs = transfer if transfer is not None and len(transfer) else None
    batch = [subsample_query(*queries[t], per_class, gen) for t in [*tasks, *(pairs.tasks if pairs else [])]]
    means, mask = pad_means(batch, dim)
    own_rows = zoo.rows_of(tasks)
    row_task = zoo.tasks[own_rows]
    query_index = [tasks.index(t) for t in row_task]
    rows = own_rows
    if pairs:  # the transfer pairs' rows follow the batch's own, their queries after the batch's
        rows = np.concatenate([own_rows, pairs.rows])
        query_index += [len(tasks) + int(i) for i in pairs.task_of_pair]
    query_of_row = torch.tensor(query_index)
    n_own = len(own_rows)
    acc = zoo.accuracy[own_rows]
    # the best model of each task (its positive), as positions within `rows`
    best = []
    for t in tasks:
        own = np.flatnonzero(row_task == t)
        if own.size == 0:
            raise SpaceError(f"task {t!r} has no model in the zoo")
        best.append(own[int(torch.argmax(acc[own]))])
    best_t = torch.tensor(best)
    weaker = torch.ones(n_own, dtype=torch.bool)
    weaker[best_t] = False
    r = torch.from_numpy(rows)
    task_feat = _task_feat(inner, zoo, r)
    q, m, pred = model(means.to(device), mask.to(device), zoo.ks[r].to(device), zoo.e[r].to(device),
                       zoo.d[r].to(device), zoo.f_emb[r].to(device), query_of_row.to(device),
                       None if task_feat is None else task_feat.to(device))
    q, m_own = q[: len(tasks)], m[:n_own]
    loss, parts = space_loss(q, m_own[best_t.to(device)], pred[:n_own], acc.to(device), lam=lam, margin=margin,
                             extra_negatives=m_own[weaker.to(device)])
    if pairs:
        t_loss = predictor_loss(pred[n_own:], torch.from_numpy(pairs.accuracy).to(device))
        loss = loss + transfer_weight * t_loss
        parts = {**parts, "loss": loss.item(), "transfer": t_loss.item()}
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return parts


def _task_feat(inner: SpaceModel, zoo: ZooArrays, rows) -> torch.Tensor | None:
    """The rows' task features when the model encoder takes them (else None)."""
    if not inner.model_encoder.task_dim:
        return None
    if zoo.task_feat is None:
        raise SpaceError("this space's model encoder takes task features: build the zoo arrays with "
                         "ZooArrays.with_task_features(queries)")
    return zoo.task_feat[rows]


@torch.no_grad()
def index_embeddings(model: nn.Module, zoo: ZooArrays, batch: int = 4096) -> torch.Tensor:
    """Model embeddings of every zoo row (N x D), in eval mode."""
    inner = _unwrap(model)
    enc = inner.model_encoder
    was = enc.training
    enc.eval()
    device = next(enc.parameters()).device
    out = []
    for s in range(0, len(zoo), batch):
        sl = slice(s, s + batch)
        task_feat = _task_feat(inner, zoo, sl)
        out.append(
            enc(zoo.ks[sl].to(device), zoo.e[sl].to(device), zoo.d[sl].to(device), zoo.f_emb[sl].to(device),
                None if task_feat is None else task_feat.to(device)).cpu()
        )
    enc.train(was)
    return torch.cat(out)


@torch.no_grad()
def evaluate_space(model: nn.Module, zoo: ZooArrays, val_queries: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """metrics.json's ``val`` object: each val task's full stored query against the full index."""
    inner = _unwrap(model)
    was = inner.training
    inner.eval()
    val_tasks = list(val_queries)
    device = next(inner.parameters()).device
    index = index_embeddings(inner, zoo).to(device)
    means, mask = pad_means([val_queries[t] for t in val_tasks], inner.query_encoder.feature_dim)
    q = inner.query_encoder.encode_means(means.to(device), mask.to(device))
    scores = (q @ index.T).cpu().numpy()
    # predicted accuracy of each row for its own task's query (only val rows are scored)
    own = [val_tasks.index(t) if t in val_queries else 0 for t in zoo.tasks]
    predicted = inner.predictor(q[torch.tensor(own, device=device)], index).cpu().numpy()
    inner.train(was)
    return space_metrics(scores, predicted, zoo.tasks, zoo.accuracy.numpy(), zoo.n_params, val_tasks)


def selection_score(metrics: dict) -> float:
    """One number to pick the best checkpoint on meta-val: lower mean rank, ties by Kendall tau."""
    tau = metrics.get("kendall_tau")
    tau = 0.0 if tau is None or not np.isfinite(tau) else float(tau)
    return -float(metrics["mean_rank"]) + 1e-3 * tau
