"""Fine-tuning a retrieved candidate on a new dataset (plain PyTorch, no Ray).

A *candidate* is a zoo subnet: a family, an :class:`~tans.zoo.subnets.Arch` and the weights of the
supernet it was measured on (the task's fine-tuned supernet, or the base supernet).
:func:`build_candidate` extracts it as a standalone network (OFA's
``get_active_subnet(preserve_weight=True)``) with a fresh, seeded classifier for the new
dataset's classes; :func:`finetune` trains it with SGD (momentum 0.9, Nesterov) and a cosine
learning rate stepped once per optimisation step over ``epochs x steps_per_epoch`` steps, so the
rate reaches ~0 at the very last step. The Ray Tune trainable that runs one trial per candidate
calls :func:`finetune` with an ``on_epoch`` callback (report + checkpoint) and resumes an
interrupted trial with ``start_epoch`` and the saved model and optimizer states: the resumed run
follows the same schedule and batches as an uninterrupted one. ``precision="bf16"`` runs the
training and evaluation forwards under bfloat16 autocast (losses in fp32; weights, optimizer and
BatchNorm recalibration fp32); ``"fp32"``, the default, is the plain fp32 path.

Sizes: :func:`model_size` of a standalone subnet equals :func:`tans.zoo.measure.count_params` /
:func:`tans.zoo.measure.count_flops` of its arch on the supernet (classifier excluded), so the
exported winner reports the same numbers as its zoo row and the constraints it was searched with.
BatchNorm recalibration, accuracy and sizes are :mod:`tans.zoo.model_ops`, shared with the zoo.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tans.data.reader import TaskTensors, iter_batches
from tans.zoo.elastic import autocast, check_precision, cosine_lr, make_optimizer
from tans.zoo.model_ops import features as features  # re-exported: the penultimate features
from tans.zoo.model_ops import (
    headless_flops,
    headless_params,
    model_device,
    recalibrate_bn_stats,
    top1_correct,
    top1_correct_loss,
)
from tans.zoo.small_maps import fast_layout
from tans.zoo.subnets import Arch, set_arch
from tans.zoo.supernets import (
    SupernetError,
    _read_checkpoint_bytes,
    _state_dict_from,
    get_family,
    load_state,
    new_head,
    unwrap,
)

DEFAULT_WEIGHT_DECAY = 4e-5  # OFA's fine-tuning default (no decay on BatchNorm and biases)
DEFAULT_MOMENTUM = 0.9


# -- splitting ---------------------------------------------------------------------------------


def split_train_val(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of indices into ``(train_idx, val_idx)`` (sorted int64 arrays).

    Each class gets ``round(n_c * val_fraction)`` validation images, clipped so that a class with
    at least 2 images keeps at least one in train and one in val; a class with a single image
    stays in train. Deterministic in ``(labels, val_fraction, seed)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_val = 0 if n < 2 else min(n - 1, max(1, int(round(n * val_fraction))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return cat(train), cat(val)


def subset(data: TaskTensors, idx) -> TaskTensors:
    """The images and labels of ``data`` at ``idx`` (same ``num_classes``)."""
    index = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
    return TaskTensors(images=data.images[index], labels=data.labels[index], num_classes=data.num_classes)


# -- building candidates -----------------------------------------------------------------------


def _fork_rng():
    return torch.random.fork_rng(devices=[])


def read_body_state(weights_uri: str) -> dict[str, torch.Tensor]:
    """The body (everything but the classifier) of the supernet checkpoint at ``weights_uri``.

    Read through :mod:`tans.storage` (local path or ``s3://``; ``ofa:<net_id>`` too) and loaded
    with ``weights_only=True``. :class:`~tans.zoo.supernets.SupernetError` (one line) otherwise.
    """
    data = _read_checkpoint_bytes(weights_uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickles code
        text = " ".join(str(err).split())[:120]
        raise SupernetError(f"{weights_uri}: not a readable weights-only PyTorch checkpoint ({text})") from None
    state = _state_dict_from(obj, weights_uri)
    return {k: v for k, v in state.items() if not k.removeprefix("module.").startswith("classifier.")}


def _extract(supernet: nn.Module, arch: Arch, num_classes: int, seed: int, preserve_weight: bool) -> nn.Module:
    set_arch(supernet, arch)
    ofa: Any = unwrap(supernet)  # an OFAMobileNetV3 (untyped)
    sub = ofa.get_active_subnet(preserve_weight=preserve_weight)
    torch.manual_seed(seed)  # the head depends on the seed only, not on what built the body
    new_head(sub, num_classes)
    return fast_layout(sub)  # the exported layers are plain NCHW convolutions again


def build_candidate(
    family_name: str,
    arch: Arch,
    num_classes: int,
    weights_uri: str | None,
    seed: int,
    dropout: float = 0.0,
) -> nn.Module:
    """A standalone subnet ``arch`` of ``family_name`` with a fresh seeded ``num_classes`` head.

    ``weights_uri`` is a supernet state dict (a task's fine-tuned supernet or the base supernet;
    local path, ``s3://`` or ``ofa:<net_id>``): its body is loaded into the family's supernet
    (every body tensor must be there), then ``arch`` is extracted with its weights. ``None``
    gives a randomly initialised network (the *scratch* baseline). Deterministic in ``seed``;
    the global RNG is left untouched. Raises :class:`~tans.zoo.supernets.SupernetError` for an
    unknown family or an unusable checkpoint, ``ValueError`` for an arch outside the family.
    """
    family = get_family(family_name)
    arch.check(family)
    body = read_body_state(weights_uri) if weights_uri else None
    with _fork_rng():
        torch.manual_seed(seed)
        supernet = family.build(num_classes, dropout=dropout)
        if body is not None and weights_uri:  # body is read only when there is a uri
            report = load_state(supernet, body, source=weights_uri)
            missing = [k for k in report["missing"]
                       if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")]
            if missing:
                raise SupernetError(f"{weights_uri}: {len(missing)} body tensors of family {family_name} are missing "
                                    f"from the checkpoint (e.g. {missing[0]}); is it a whole supernet state dict?")
        return _extract(supernet, arch, num_classes, seed, preserve_weight=True)


def build_structure(family_name: str, arch: Arch, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """The network :func:`build_candidate` returns, with arbitrary weights (to load a state dict into)."""
    family = get_family(family_name)
    arch.check(family)
    with _fork_rng():
        supernet = family.build(num_classes, dropout=dropout)
        return _extract(supernet, arch, num_classes, 0, preserve_weight=False)


# -- features, accuracy, size ------------------------------------------------------------------


def extract_features(model: nn.Module, data: TaskTensors, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of every image of ``data`` (eval mode, no grad), ``N x D`` float32."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        with torch.no_grad():
            for images, _ in iter_batches(data, batch_size):
                out.append(features(model, images.to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def evaluate_accuracy(model: nn.Module, data: TaskTensors, batch_size: int = 256, precision: str = "fp32") -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, no grad; the mode is restored).

    ``precision="bf16"``: the forwards run under bfloat16 autocast (logits cast to fp32).
    (:func:`tans.zoo.model_ops.top1_correct`, as the zoo's accuracies.)
    """
    if len(data) == 0:
        raise ValueError("evaluate_accuracy needs at least one image")
    correct, _ = top1_correct(model, iter_batches(data, batch_size), precision)
    return correct / len(data)


def evaluate_accuracy_loss(model: nn.Module, data: TaskTensors, batch_size: int = 256,
                           precision: str = "fp32") -> tuple[float, float]:
    """``(top-1 accuracy, mean cross-entropy)`` of ``model`` on ``data``, in one pass (eval mode, no
    grad; the mode is restored); the same hits as :func:`evaluate_accuracy`.

    The loss is graded where accuracy counts hits: on a validation split of ~100 images two
    fine-tunes often tie or swap on accuracy by one image while the loss still tells them apart.
    """
    if len(data) == 0:
        raise ValueError("evaluate_accuracy_loss needs at least one image")
    correct, _, loss = top1_correct_loss(model, iter_batches(data, batch_size), precision)
    return correct / len(data), loss / len(data)


def recalibrate_bn(model: nn.Module, data: TaskTensors, batch_size: int, max_images: int | None = None,
                   seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` on ``data``; returns images used.

    Statistics are reset and re-accumulated as an exact average over batches of ``batch_size``
    (the last partial batch is dropped unless it is the only one) of all images, or of
    ``max_images`` of them drawn with ``seed`` (not the first ones: data is often sorted by
    class). Deterministic; only features are computed, so the classifier and its dropout are
    not run. The same recalibration as the zoo's accuracies
    (:func:`tans.zoo.model_ops.recalibrate_bn_stats`): after a short fine-tune the momentum
    averages lag far behind the weights.
    """
    n = len(data) if max_images is None else min(len(data), max_images)
    if n < 2:
        raise ValueError(f"BatchNorm recalibration needs at least 2 images, got {n}")
    if n < len(data):
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        data = subset(data, pick.sort().values)
    bs = min(batch_size, n)
    return recalibrate_bn_stats(model, iter_batches(data, bs, drop_last=True))


def model_size(model: nn.Module, image_size: int) -> tuple[int, int]:
    """``(n_params, flops)`` of a standalone subnet without its classifier head.

    The zoo's definitions (:mod:`tans.zoo.model_ops`, as :mod:`tans.zoo.measure` counts them):
    parameters of everything but the classifier; FLOPs counted by ``FlopCounterMode`` (2 per
    multiply-add) for one 3-channel ``image_size`` image in eval mode. Equal to ``count_params``
    / ``count_flops`` of the same arch on its supernet.
    """
    return headless_params(model), headless_flops(model, image_size)


# -- fine-tuning -------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What :func:`finetune` did; per-epoch lists cover the epochs run by this call only."""

    epochs: list[int] = field(default_factory=list)  # 0-based indices of the epochs run here
    train_loss: list[float] = field(default_factory=list)  # mean loss per epoch
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)  # mean cross-entropy on the validation split
    test_accuracy: list[float] = field(default_factory=list)  # empty when no test set was given
    lrs: list[float] = field(default_factory=list)  # the learning rate of every step run here
    seconds: float = 0.0
    steps_per_epoch: int = 0
    total_steps: int = 0
    batch_size: int = 0  # the batch size used (the train set's size if it is smaller)
    stopped_early: bool = False  # on_epoch returned True

    @property
    def best_epoch(self) -> int:
        """The epoch (0-based, of those run here) with the best validation accuracy (first on ties)."""
        if not self.val_accuracy:
            raise ValueError("no epoch was run")
        return self.epochs[int(np.argmax(self.val_accuracy))]


def steps_per_epoch(n_train: int, batch_size: int) -> tuple[int, int]:
    """``(batch size used, optimisation steps per epoch)`` for ``n_train`` images (``drop_last``)."""
    if n_train < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images (BatchNorm cannot train on 1), got {n_train}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm cannot train on 1), got {batch_size}")
    used = min(batch_size, n_train)
    return used, n_train // used


# long because its docstring is the contract (schedule, seeding, exact resume, BN, precision) that
# search, evaluation and their resume tests rely on; the code itself is ~60 lines.
def finetune(
    model: nn.Module,
    train: TaskTensors,
    val: TaskTensors,
    test: TaskTensors | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    momentum: float = DEFAULT_MOMENTUM,
    on_epoch: Callable[[int, dict, nn.Module, torch.optim.Optimizer], bool | None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    model_state: dict | None = None,
    device: str | torch.device = "cpu",
    eval_batch_size: int = 256,
    bn_images: int | None = 2000,
    precision: str = "fp32",
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` for epochs ``start_epoch .. epochs-1``; evaluate after each.

    SGD (``momentum``, Nesterov; ``weight_decay`` on weights only) with a cosine learning rate
    from ``lr`` to 0, set before every optimisation step over a horizon of
    ``epochs x steps_per_epoch`` steps. Epoch ``k`` shuffles with ``(seed, k)`` and drops the
    last partial batch (a train set smaller than ``batch_size`` is one batch); any randomness in
    the model (dropout) is seeded per epoch too, so results are deterministic on CPU and a run
    resumed at ``start_epoch`` with the model and optimizer states saved after epoch
    ``start_epoch - 1`` (``model_state`` or loaded beforehand, and ``optimizer_state``) ends
    exactly as an uninterrupted one.

    Before each evaluation, BatchNorm statistics are recalibrated on the first ``bn_images``
    training images (:func:`recalibrate_bn`; ``0`` keeps the running averages), as the zoo's
    accuracies were measured: with few steps, momentum averages lag the weights and a fine-tuned
    network predicts one class in eval mode. The recalibrated statistics stay in the model (and
    in its checkpoints and export); training then continues from them.

    After each epoch, ``on_epoch(epoch, metrics, model, optimizer)`` is called with the 0-based
    ``epoch`` just finished and ``metrics`` = ``{"epochs_done", "train_loss", "val_accuracy",
    "val_loss", "test_accuracy" (if ``test``), "lr", "steps", "seconds"}``; to resume after it, pass
    ``start_epoch=metrics["epochs_done"]``. If it returns ``True`` training stops there.
    The model is left in train mode on ``device``.

    ``precision="bf16"`` runs the training and evaluation forwards under bfloat16 autocast; the
    loss is taken on ``logits.float()``, backward and the optimizer step run outside autocast,
    and the BatchNorm recalibration stays fp32. ``"fp32"`` is the plain fp32 path.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch must be between 0 and epochs={epochs}, got {start_epoch}")
    if len(val) == 0:
        raise ValueError("the validation set is empty")
    check_precision(precision)
    used_bs, per_epoch = steps_per_epoch(len(train), batch_size)
    total = epochs * per_epoch
    device = torch.device(device)
    model.to(device)
    if model_state is not None:
        model.load_state_dict(model_state)
    optimizer = make_optimizer(model, lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    result = FinetuneResult(steps_per_epoch=per_epoch, total_steps=total, batch_size=used_bs)
    start = time.perf_counter()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    for epoch in range(start_epoch, epochs):
        model.train()
        losses = []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed * 1_000_003 + epoch)  # dropout etc.: the same on a resumed run
            batches = iter_batches(train, used_bs, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
            for i, (images, labels) in enumerate(batches):
                step = epoch * per_epoch + i
                current_lr = cosine_lr(step, total, lr)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    logits = model(images.to(device))
                loss = F.cross_entropy(logits.float(), labels.to(device))  # .float(): a no-op in fp32
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                result.lrs.append(current_lr)
        if bn_images != 0:
            recalibrate_bn(model, train, used_bs, bn_images, seed=seed)  # fp32, outside autocast
        metrics = {
            "epochs_done": epoch + 1,
            "train_loss": float(np.mean(losses)),
        }
        metrics["val_accuracy"], metrics["val_loss"] = evaluate_accuracy_loss(model, val, eval_batch_size, precision)
        result.epochs.append(epoch)
        result.train_loss.append(metrics["train_loss"])
        result.val_accuracy.append(metrics["val_accuracy"])
        result.val_loss.append(metrics["val_loss"])
        if test is not None:
            metrics["test_accuracy"] = evaluate_accuracy(model, test, eval_batch_size, precision)
            result.test_accuracy.append(metrics["test_accuracy"])
        result.seconds = time.perf_counter() - start
        metrics.update(lr=result.lrs[-1], steps=(epoch + 1) * per_epoch, seconds=result.seconds)
        if on_epoch is not None and on_epoch(epoch, metrics, model, optimizer) is True:
            result.stopped_early = epoch + 1 < epochs
            break
    model.train()
    result.seconds = time.perf_counter() - start
    return result
