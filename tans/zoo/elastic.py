"""Training a supernet with the sandwich rule (plain PyTorch; single process or one DDP worker).

Each optimizer step trains the largest subnet, the smallest and ``random_subnets`` random ones on
the same batch (BigNAS/OFA's "sandwich rule"): their gradients are summed into one step, so the
shared weights serve every size at once. The model may come wrapped in DDP; archs are set on
``unwrap(model)`` and the forward goes through the wrapper, so gradients are averaged across
workers. Wrap with ``find_unused_parameters=True``: small subnets leave blocks and channels
unused. Every rank draws the same random archs (their rng is seeded by ``(seed, step)``), as
OFA's distributed trainer does: otherwise ranks would average gradients of different subnets.

``precision="bf16"`` runs the forward passes under ``torch.autocast`` (bfloat16, on the model's
device type: CUDA, or CPU in tests); losses are taken in fp32 on ``logits.float()`` and backward,
the optimizer, weights and BatchNorm running statistics stay fp32. ``"fp32"`` (the default) is
the plain fp32 path, bit for bit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tans.data.reader import TaskTensors, iter_batches
from tans.zoo.subnets import largest, random_arch, set_arch, smallest
from tans.zoo.supernets import SupernetFamily, load_state, unwrap

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: str | torch.device, precision: str = "fp32") -> torch.autocast:
    """The autocast context for forward passes on ``device``: bfloat16 for ``"bf16"``, off for ``"fp32"``.

    Disabled autocast changes nothing, so the fp32 path stays bit-identical. Only the forward
    pass belongs inside it: compute losses on ``logits.float()`` and call ``backward`` outside.
    """
    device_type = torch.device(device).type
    return torch.autocast(device_type="cuda" if device_type == "cuda" else "cpu", dtype=torch.bfloat16,
                          enabled=check_precision(precision) == "bf16")


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 3e-5) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on BatchNorm parameters and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # 1-d parameters are exactly the BN scales/shifts and biases (OFA's "bn#bias" rule).
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate for 0-based optimizer step ``step`` of ``total_steps``.

    Linear warm-up over ``warmup_steps`` (from ``base_lr / warmup_steps``), then a cosine from
    ``base_lr`` down to 0 at ``total_steps``; a resumed run keeps the same horizon.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def sandwich_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    family: SupernetFamily,
    rng: random.Random,
    random_subnets: int = 1,
    precision: str = "fp32",
) -> float:
    """One optimizer step over the largest, the smallest and ``random_subnets`` random archs.

    Gradients of the subnets' cross-entropy losses are summed; returns their mean loss. The
    model is left set to the largest arch. ``precision="bf16"``: forwards under bf16 autocast,
    losses in fp32.
    """
    net = unwrap(model)
    model.train()
    archs = [largest(family), smallest(family)] + [random_arch(family, rng) for _ in range(random_subnets)]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for arch in archs:
        set_arch(net, arch)
        with autocast(images.device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)  # .float(): a no-op in fp32
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    set_arch(net, archs[0])
    return total / len(archs)


def train_supernet(
    model: nn.Module,
    data: TaskTensors,
    family: SupernetFamily,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.9,
    weight_decay: float = 3e-5,
    random_subnets: int = 1,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    on_epoch_end: Callable[[int, int], None] | None = None,
    log: Callable[[int, dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str = "fp32",
    warmup_steps: int = 0,
) -> dict:
    """Train ``model`` for optimizer steps ``start_step .. steps-1`` with the sandwich rule.

    Batches come from this rank's shard (``iter_batches(shuffle=True, seed, epoch, rank,
    world_size, drop_last=True)``); epoch ``k`` covers steps ``k*n .. k*n+n-1`` where ``n`` is the
    number of full batches per shard, so a run resumed at ``start_step`` (with the weights and
    optimizer state of that step) sees exactly the batches the uninterrupted run would have.
    The learning rate follows :func:`cosine_lr` over ``steps``, after ``warmup_steps`` of linear
    warm-up. ``on_epoch_end(epoch, step)``
    runs after every full epoch and once more if the last step falls inside an epoch (for
    checkpoints); ``log(step, {"loss", "lr", "epoch"})`` after every step, ``step`` counting the
    steps done (for curves). Pass ``optimizer`` to resume with a restored optimizer state.
    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast forwards; see :func:`sandwich_step`).
    Returns ``{"losses": [per step run here], "steps": steps done in total}``.
    """
    check_precision(precision)
    per_epoch = (len(data) // world_size) // batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(data)} images cannot fill one batch of {batch_size} on each of {world_size} workers; "
                         "lower batch_size")
    if optimizer is None:
        optimizer = make_optimizer(model, lr, momentum, weight_decay)
    losses: list[float] = []
    step = start_step
    epoch = step // per_epoch
    device = next(unwrap(model).parameters()).device
    while step < steps:
        skip = step - epoch * per_epoch  # > 0 only in the epoch a resumed run starts in
        for i, (images, labels) in enumerate(iter_batches(
            data, batch_size, shuffle=True, seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=True
        )):
            # Ranks' shards differ by at most one image: cap each epoch at the common length,
            # or one DDP rank would wait forever for the others' extra step.
            if i >= per_epoch or step >= steps:
                break
            if i < skip:
                continue
            current_lr = cosine_lr(step, steps, lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            # Same archs on every rank: the rng depends on (seed, step) only.
            rng = random.Random(seed * 1_000_003 + step)
            loss = sandwich_step(model, images.to(device), labels.to(device), optimizer, family, rng, random_subnets,
                                 precision)
            losses.append(loss)
            step += 1
            if log is not None:
                log(step, {"loss": loss, "lr": current_lr, "epoch": epoch})
        finished_epoch = step == (epoch + 1) * per_epoch
        if on_epoch_end is not None and (finished_epoch or step >= steps):
            on_epoch_end(epoch, step)
        epoch += 1
    return {"losses": losses, "steps": step}


def finetune_for_task(
    base_state: dict,
    family: SupernetFamily,
    num_classes: int,
    data: TaskTensors,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    random_subnets: int = 1,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[nn.Module, dict]:
    """Fine-tune the base supernet on one task: same body, a new ``num_classes`` head.

    ``base_state`` is the base supernet's state dict (its head may have any size; see
    :func:`tans.zoo.supernets.load_state`). Returns the trained supernet (set to its largest arch)
    and ``{"losses", "steps", "loaded"}`` (``loaded``: body tensors copied from ``base_state``).
    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast forwards; weights and BatchNorm stay fp32).
    """
    state = base_state["state_dict"] if isinstance(base_state.get("state_dict"), dict) else base_state
    body = {k: v for k, v in state.items() if not k.removeprefix("module.").startswith("classifier.")}
    with torch.random.fork_rng(devices=[]):  # seeds the new head without touching the caller's RNG
        torch.manual_seed(seed)
        model = family.build(num_classes)  # a fresh head, whatever the base head's size
    loaded = load_state(model, body, source="base supernet")["loaded"]
    model.to(device)
    result = train_supernet(model, data, family, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            random_subnets=random_subnets, precision=precision)
    return model, {**result, "loaded": loaded}
