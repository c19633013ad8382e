"""The model utilities shared by the zoo's measurements and a search's fine-tunes (plain PyTorch).

One implementation of each, used by :mod:`tans.zoo.measure` (subnets measured in place on a
supernet) and :mod:`tans.selection.finetune` (standalone subnets fine-tuned for a new dataset):

* :func:`features`: penultimate features (the classifier's input) of a supernet's active subnet
  or of a standalone subnet;
* :func:`recalibrate_bn_stats`: BatchNorm running statistics re-estimated as an exact
  cumulative average (``momentum=None``) over batches, in train mode, no grad, fp32;
* :func:`top1_correct` (and :func:`top1_correct_loss`, with the summed cross-entropy): top-1
  hits over ``(images, labels)`` batches in eval mode, no grad, the forwards optionally under
  bfloat16 autocast;
* :func:`flops_of`, :func:`headless_params`, :func:`headless_flops`: the zoo's size
  definitions: parameters of everything but the classifier head; FLOPs counted with the
  formulas of PyTorch's ``FlopCounterMode`` (2 per multiply-add: convolutions and matmuls
  only) for one 3-channel image, in eval mode, without the head.

Every function leaves the model's train/eval mode (and the BatchNorm momenta) as it found them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from tans.zoo.elastic import autocast
from tans.zoo.small_maps import plain_copy
from tans.zoo.supernets import forward_features, unwrap


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameters."""
    return next(model.parameters()).device


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``, in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features (the classifier's input) of a standalone subnet or a supernet."""
    net: Any = unwrap(model)  # an OFA network (untyped): a supernet or an exported MobileNetV3
    if hasattr(net, "runtime_depth"):  # an OFA supernet: its active subnet
        return forward_features(net, x)
    x = net.first_conv(x)
    for block in net.blocks:
        x = block(x)
    x = net.final_expand_layer(x)
    x = net.global_avg_pool(x)
    x = net.feature_mix_layer(x)
    return x.flatten(1)


def recalibrate_bn_stats(model: nn.Module, batches: Iterable) -> int:
    """Reset and re-estimate every BatchNorm's running statistics of ``model``; returns images used.

    ``batches`` yields float image tensors or ``(images, labels)`` pairs (labels unused). The
    statistics are reset and re-accumulated as an exact cumulative average (``momentum=None``)
    of the batches' statistics, in train mode and without grad, outside any autocast (fp32).
    Only :func:`features` are computed, so the classifier (and its dropout) never runs. The
    momenta and the train/eval mode are restored afterwards. ``ValueError`` if ``batches`` is
    empty (raised after the restore; the statistics are then reset).
    """
    bns = bn_layers(model)
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    device = model_device(model)
    seen = images_used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                features(model, images.to(device))  # the head has no BatchNorm
                seen += 1
                images_used += int(images.shape[0])
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return images_used


def top1_correct_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      precision: str = "fp32") -> tuple[int, int, float]:
    """``(correct, total, summed cross-entropy)`` of ``model`` over ``(images, labels)`` batches.

    Eval mode (restored afterwards), no grad; ``precision="bf16"`` runs the forwards under
    bfloat16 autocast (the logits are cast to fp32 before the argmax and the loss).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = total = 0
    loss = 0.0
    try:
        with torch.no_grad():
            for images, labels in batches:
                with autocast(device, precision):
                    logits = model(images.to(device))
                logits, labels = logits.float(), labels.to(device)
                correct += int((logits.argmax(dim=1) == labels).sum())
                loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                total += int(labels.shape[0])
    finally:
        model.train(was_training)
    return correct, total, loss


def top1_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 precision: str = "fp32") -> tuple[int, int]:
    """``(correct, total)`` top-1 predictions of ``model`` (:func:`top1_correct_loss`)."""
    correct, total, _ = top1_correct_loss(model, batches, precision)
    return correct, total


class _FlopTally(TorchDispatchMode):
    """Sums ``FlopCounterMode``'s per-operator formulas (``flop_registry``) over what runs inside.

    The same formulas give the same totals (``tests/tans/zoo/test_measure.py`` compares them);
    what it leaves out is ``FlopCounterMode``'s attribution of FLOPs to modules (a hook on every
    module and bookkeeping on every operator), which made counting a 48-px subnet ~7x slower
    than counting alone, a quarter of measuring a zoo subnet on CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops_of(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``module(x)`` as ``FlopCounterMode`` counts them (2 per multiply-add), no grad."""
    with torch.no_grad(), _FlopTally() as tally:
        plain_copy(module)(x)
    return int(tally.total)


def headless_params(model: nn.Module) -> int:
    """Parameters of a standalone network without its classifier head (``classifier.*``)."""
    net = unwrap(model)
    return int(sum(p.numel() for name, p in net.named_parameters() if not name.startswith("classifier.")))


def headless_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one 3-channel ``image_size`` image through a standalone network without its head.

    Counted in eval mode with the classifier replaced by the identity; both are restored.
    """
    net: Any = unwrap(model)  # an OFA network (untyped): its classifier is an attribute
    head, was_training = net.classifier, net.training
    net.classifier = nn.Identity()
    net.eval()
    try:
        x = torch.zeros(1, 3, image_size, image_size, device=model_device(net))
        return flops_of(net, x)
    finally:
        net.classifier = head
        net.train(was_training)
