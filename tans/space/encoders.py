"""The three networks of TANS's cross-modal space: a query encoder, a model encoder, a predictor.

A *query* is a small labelled sample of a dataset: frozen image features ``X`` (n_images x
feature_dim) with integer labels ``y``. A *model* is a zoo row: its architecture (``ks``, ``e``,
``d``) and its functional embedding ``f_emb``. Both encoders end in an L2-normalised vector so that
a dot product is a cosine similarity; the predictor maps a (query, model) pair to accuracy in [0,1].

No ``import ray`` here: this module is used by the training job, the retriever and the service.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The zoo row layout (same values as tans.zoo.subnets; repeated so this module imports nothing heavy).
N_STAGES = 5
SLOTS_PER_STAGE = 4


class SpaceError(ValueError):
    """Bad input to the cross-modal space (wrong feature size, too few classes, bad k...)."""


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


def class_means(features: torch.Tensor, labels: torch.Tensor, feature_dim: int | None = None) -> torch.Tensor:
    """Per-class mean features (n_classes x feature_dim), classes in sorted label order.

    Raises SpaceError for a feature size other than ``feature_dim`` or fewer than 2 classes.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = torch.as_tensor(labels)
    if features.ndim != 2:
        raise SpaceError(f"query features must be 2-D (n_images x feature_dim), got shape {tuple(features.shape)}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise SpaceError(
            f"query feature size {features.shape[1]} differs from the encoder's {feature_dim}; "
            "extract the query with the same feature extractor the space was trained with"
        )
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise SpaceError(f"query has {features.shape[0]} feature rows but {labels.numel()} labels")
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    if classes.numel() < 2:
        raise SpaceError(f"a query needs at least 2 classes, got {classes.numel()}")
    # index_add sums rows per class in one op; dividing by counts gives the means.
    sums = torch.zeros(classes.numel(), features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, inverse.to(features.device), features)
    counts = torch.bincount(inverse, minlength=classes.numel()).to(features)
    return sums / counts[:, None]


class QueryEncoder(nn.Module):
    """Dataset (features, labels) -> unit vector of size ``embed_dim``.

    Per-class means go through a shared per-class MLP (DeepSets' phi), are pooled over classes
    (mean, plus optionally single-head attention pooling with a learned seed), and an MLP (rho)
    maps the pool to the embedding. Means over images and a symmetric pool over classes make the
    output invariant to the order of images and of classes, and to the label values themselves.
    """

    def __init__(self, feature_dim: int, embed_dim: int = 128, hidden: int = 256, attention: bool = False):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim)
        self.attention = bool(attention)
        self.phi = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        if self.attention:
            # one learned query vector attends over the classes (a PMA block with one seed)
            self.seed = nn.Parameter(torch.randn(hidden) / hidden**0.5)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
        pooled = hidden * (2 if self.attention else 1)
        self.rho = _mlp(pooled, hidden, self.embed_dim)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: B x C x H per-class codes, mask: B x C (True = real class) -> B x pooled."""
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if not self.attention:
            return pooled
        scores = (self.key(h) @ self.seed) / h.shape[-1] ** 0.5  # B x C
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)[..., None]
        return torch.cat([pooled, (attn * self.value(h)).sum(1)], dim=-1)

    def encode_means(self, means: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-class means (B x C x feature_dim, padded; ``mask`` B x C marks real classes) -> B x embed_dim."""
        if mask is None:
            mask = torch.ones(means.shape[:2], dtype=torch.bool, device=means.device)
        z = self.rho(self._pool(self.phi(means), mask))
        return F.normalize(z, dim=-1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One query: features (n x feature_dim), labels (n,) -> unit vector (embed_dim,)."""
        means = class_means(features, labels, self.feature_dim).to(next(self.parameters()).device)
        return self.encode_means(means[None])[0]

    def encode_many(self, queries: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Many queries of different sizes: a list of (features, labels) -> Q x embed_dim.

        Class means are padded to the largest class count and masked, so one forward pass
        serves the whole batch.
        """
        if len(queries) == 0:
            raise SpaceError("encode_many needs at least one query")
        means = [class_means(x, y, self.feature_dim) for x, y in queries]
        c_max = max(m.shape[0] for m in means)
        device = next(self.parameters()).device
        padded = torch.zeros(len(means), c_max, self.feature_dim, device=device)
        mask = torch.zeros(len(means), c_max, dtype=torch.bool, device=device)
        for i, m in enumerate(means):
            padded[i, : m.shape[0]] = m
            mask[i, : m.shape[0]] = True
        return self.encode_means(padded, mask)


def _choices(family) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    if isinstance(family, (tuple, list)):
        ks, e, d, f_dim = family
    else:  # a SupernetFamily (duck-typed: no import of the supernet code needed here)
        ks, e, d, f_dim = family.ks_choices, family.e_choices, family.d_choices, family.penultimate_dim
    return tuple(int(v) for v in ks), tuple(int(v) for v in e), tuple(int(v) for v in d), int(f_dim)


def _lookup(choices: Sequence[int]) -> torch.Tensor:
    """Table value -> (rank+1)/len(choices) for a valid choice, 0 for anything else (empty slot).

    Ranks start at 1/len so the smallest real choice never collides with the empty-slot 0.
    """
    table = torch.zeros(max(choices) + 1)
    for rank, v in enumerate(sorted(set(choices))):
        table[v] = (rank + 1) / len(set(choices))
    return table


class ModelEncoder(nn.Module):
    """(ks[], e[], d[], f_emb[, task_feat]) -> unit vector of size ``embed_dim``.

    ``family`` is a SupernetFamily or a tuple ``(ks_choices, e_choices, d_choices, f_emb_dim)``.
    Architecture values are mapped to (0, 1] by their rank among the family's choices (0 marks an
    unused block slot, ks = e = 0); ``f_emb`` is layer-normalised (its scale depends on the
    task's data; the pattern across units is what carries the function) and concatenated before the MLP.
    With ``task_dim`` > 0 the model also carries what it was trained on: ``task_feat``, the mean
    query feature of its zoo task (``task_dim`` = the query feature size), layer-normalised too, so
    the space can relate a query to the models' training data rather than memorise task identities.
    """

    # Buffers (registered in __init__), declared for the type checker.
    ks_table: torch.Tensor
    e_table: torch.Tensor
    d_table: torch.Tensor

    def __init__(self, family, embed_dim: int = 128, hidden: int = 256, task_dim: int = 0):
        super().__init__()
        self.ks_choices, self.e_choices, self.d_choices, self.f_emb_dim = _choices(family)
        self.embed_dim = int(embed_dim)
        self.task_dim = int(task_dim)
        self.register_buffer("ks_table", _lookup(self.ks_choices), persistent=False)
        self.register_buffer("e_table", _lookup(self.e_choices), persistent=False)
        self.register_buffer("d_table", _lookup(self.d_choices), persistent=False)
        self.f_norm = nn.LayerNorm(self.f_emb_dim, elementwise_affine=False)
        # Every family shares the zoo's row schema (tans.zoo.subnets): 5 stages x 4 slots, so ks/e are
        # 20 long and d is 5; a family with a smaller max depth just never fills the last slots.
        self._d_len = N_STAGES
        self._ks_len = N_STAGES * SLOTS_PER_STAGE
        if self.task_dim:
            self.task_norm = nn.LayerNorm(self.task_dim, elementwise_affine=False)
        self.mlp = _mlp(2 * self._ks_len + self._d_len + self.f_emb_dim + self.task_dim, hidden, self.embed_dim)

    def arch_features(self, ks: torch.Tensor, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Integer ks (B x 20), e (B x 20), d (B x 5) -> B x 45 values in [0, 1]."""
        ks, e, d = (torch.as_tensor(t, dtype=torch.long, device=self.ks_table.device) for t in (ks, e, d))
        if ks.shape[-1] != self._ks_len or e.shape[-1] != self._ks_len or d.shape[-1] != self._d_len:
            raise SpaceError(
                f"architecture lengths ks={ks.shape[-1]}, e={e.shape[-1]}, d={d.shape[-1]} do not fit this family "
                f"(expected {self._ks_len}, {self._ks_len}, {self._d_len})"
            )
        def look(table, v):  # out-of-range values (not a choice of this family) read as empty
            return table[v.clamp(0, table.numel() - 1)] * (v < table.numel())
        return torch.cat([look(self.ks_table, ks), look(self.e_table, e), look(self.d_table, d)], dim=-1)

    def forward(self, ks: torch.Tensor, e: torch.Tensor, d: torch.Tensor, f_emb: torch.Tensor,
                task_feat: torch.Tensor | None = None) -> torch.Tensor:
        """Batched zoo rows -> B x embed_dim unit vectors (a single row may be passed without batch dim).

        ``task_feat`` (B x task_dim) is required exactly when the encoder has a ``task_dim``.
        """
        f_emb = torch.as_tensor(f_emb, dtype=torch.float32, device=self.ks_table.device)
        single = f_emb.ndim == 1
        if (task_feat is None) != (self.task_dim == 0):
            raise SpaceError(f"this model encoder takes {'no ' if not self.task_dim else ''}task features "
                             f"(task_dim={self.task_dim}), got {'none' if task_feat is None else 'some'}")
        if single:
            ks, e, d, f_emb = (torch.as_tensor(t)[None] for t in (ks, e, d, f_emb))
            task_feat = None if task_feat is None else torch.as_tensor(task_feat)[None]
        if f_emb.shape[-1] != self.f_emb_dim:
            raise SpaceError(f"f_emb size {f_emb.shape[-1]} differs from the encoder's {self.f_emb_dim}")
        parts = [self.arch_features(ks, e, d), self.f_norm(f_emb)]
        if task_feat is not None:
            task_feat = torch.as_tensor(task_feat, dtype=torch.float32, device=self.ks_table.device)
            if task_feat.shape[-1] != self.task_dim:
                raise SpaceError(f"task feature size {task_feat.shape[-1]} differs from the encoder's {self.task_dim}")
            parts.append(self.task_norm(task_feat))
        x = torch.cat(parts, dim=-1)
        z = F.normalize(self.mlp(x), dim=-1)
        return z[0] if single else z


class PerformancePredictor(nn.Module):
    """(query embedding, model embedding) -> predicted accuracy in [0, 1].

    Input is [q, m, q*m]: the product lets a small MLP see the similarity directly.
    """

    def __init__(self, embed_dim: int, hidden: int = 128):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(3 * self.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query_emb: torch.Tensor, model_emb: torch.Tensor) -> torch.Tensor:
        """Broadcastable (..., D) embeddings -> (...) accuracies in [0, 1]."""
        query_emb, model_emb = torch.broadcast_tensors(query_emb, model_emb)
        x = torch.cat([query_emb, model_emb, query_emb * model_emb], dim=-1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)
