"""TANS's training objective: a hard-negative contrastive loss plus an MSE loss on the predictor.

What is implemented (VSE++ "max of hinges", Faghri et al. 2018, as TANS uses it):

A batch holds B pairs (q_i, m_i): the embedding of a query of task t_i and of a high-accuracy
model of that same task (e.g. its best model). With unit vectors, S = Q @ M.T is the B x B matrix of
cosine similarities; the positives sit on the diagonal, s_ii. An off-diagonal entry (i, j) is a
negative only when t_j != t_i (two pairs of the same task in one batch are not pushed apart).

    query -> model:  l_i^qm = max(0, margin - s_ii + max_{j: t_j != t_i} s_ij)
    model -> query:  l_i^mq = max(0, margin - s_ii + max_{j: t_j != t_i} s_ji)
    contrastive_loss = mean_i (l_i^qm + l_i^mq)          (VSE++ sums; we average over the batch so
                                                            the scale does not depend on B)

Only the hardest negative per row/column contributes (max-violation). A row with no valid
negative contributes 0. Optionally, ``extra_negatives`` (E x D model embeddings, e.g. the weaker
models of the batch's tasks, own task included) join every query's negatives in the
query -> model direction: max_j then also runs over s(q_i, n_e) for all e. Without them the loss
only orders tasks, never a task's own models; with them a task's best model must also beat its
weaker siblings by the margin. The loss is exactly 0 when, for every i, s_ii >= s_ij + margin and
s_ii >= s_ji + margin for every negative j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MARGIN = 0.2


def contrastive_loss(
    query_emb: torch.Tensor,
    model_emb: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    margin: float = MARGIN,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional max-violation hinge loss over a batch of positive pairs.

    query_emb, model_emb: B x D unit vectors, row i of each forms a positive pair.
    task_ids: optional (B,) ints; pairs that share a task are not negatives of each other
    (default: every off-diagonal pair is a negative). extra_negatives: optional E x D model
    embeddings that are negatives of every query (query -> model direction only).
    Returns a scalar tensor.
    """
    if query_emb.shape != model_emb.shape or query_emb.ndim != 2:
        raise ValueError(f"expected two B x D tensors, got {tuple(query_emb.shape)} and {tuple(model_emb.shape)}")
    b = query_emb.shape[0]
    sims = query_emb @ model_emb.T
    pos = sims.diagonal()
    if task_ids is None:
        not_neg = torch.eye(b, dtype=torch.bool, device=sims.device)
    else:
        task_ids = torch.as_tensor(task_ids, device=sims.device)
        not_neg = task_ids[:, None] == task_ids[None, :]
    # -inf for non-negatives so they never win the max; a row of only -inf gives a hinge of 0.
    neg = sims.masked_fill(not_neg, float("-inf"))
    hardest_qm = neg.max(dim=1).values  # hardest model for each query
    if extra_negatives is not None and extra_negatives.shape[0] > 0:
        hardest_qm = torch.maximum(hardest_qm, (query_emb @ extra_negatives.T).max(dim=1).values)
    hardest_mq = neg.max(dim=0).values  # hardest query for each model
    loss_qm = torch.clamp(margin - pos + hardest_qm, min=0.0)
    loss_mq = torch.clamp(margin - pos + hardest_mq, min=0.0)
    return (loss_qm + loss_mq).mean()


def predictor_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and measured accuracies (both in [0, 1])."""
    return F.mse_loss(predicted, torch.as_tensor(target, dtype=predicted.dtype, device=predicted.device))


def space_loss(
    query_emb: torch.Tensor,
    model_emb: torch.Tensor,
    predicted: torch.Tensor,
    target: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    lam: float = 1.0,
    margin: float = MARGIN,
    extra_negatives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """contrastive_loss(query_emb, model_emb) + lam * predictor_loss(predicted, target).

    The predictor terms may cover other pairs than the contrastive batch (e.g. every model of the
    batch's tasks). Returns the total and a dict of the parts (floats) for logging.
    """
    c = contrastive_loss(query_emb, model_emb, task_ids, margin, extra_negatives)
    p = predictor_loss(predicted, target)
    total = c + lam * p
    return total, {"loss": total.item(), "contrastive": c.item(), "mse": p.item()}
