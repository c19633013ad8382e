"""Measuring a subnet for its zoo row: accuracy, parameters, FLOPs, functional embedding.

Definitions (the zoo row schema, tans.zoo.store.ZOO_SCHEMA):

* ``n_params`` and ``flops`` count the exported subnet (``get_active_subnet``) *without* its
  classifier head, since heads differ with the number of classes; FLOPs come from the formulas
  of ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add: convolutions and matmuls
  only, not BatchNorm or activations) for one image at the zoo's image size, in eval mode.
* ``f_emb`` is the mean penultimate feature (the classifier's input) over one fixed, seeded
  Gaussian probe batch, with the subnet's recalibrated BatchNorm statistics.
* accuracy is top-1 on the test batches after BatchNorm recalibration on training batches.
  With ``precision="bf16"`` only that accuracy forward runs under bfloat16 autocast; the
  recalibration, the counts and ``f_emb`` stay fp32.

Everything runs on the supernet in place (no per-subnet copy): only the counts build a static
subnet, and those depend on the architecture alone, so they are cached across tasks. The
recalibration, accuracy and counting code is :mod:`tans.zoo.model_ops`, shared with the
fine-tunes of :mod:`tans.selection.finetune`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tans.zoo.model_ops import (
    bn_layers,
    headless_flops,
    headless_params,
    model_device,
    recalibrate_bn_stats,
    top1_correct,
)
from tans.zoo.model_ops import flops_of as flops_of  # re-exported: the zoo's FLOP convention
from tans.zoo.small_maps import make_plain
from tans.zoo.subnets import Arch, set_arch
from tans.zoo.supernets import forward_features, unwrap


@dataclass
class Measurement:
    """What a zoo row records about one subnet on one task."""

    accuracy: float
    n_params: int
    flops: int
    f_emb: np.ndarray  # float32, length = family.penultimate_dim


# (supernet structure, arch, image size or None) -> count; archs repeat across tasks.
_COUNT_CACHE: dict[tuple, int] = {}


def _structure(net: nn.Module) -> tuple:
    ofa: Any = net  # an OFAMobileNetV3: its choice lists are untyped attributes
    return (type(ofa).__name__, ofa.width_mult, tuple(ofa.ks_list), tuple(ofa.expand_ratio_list), tuple(ofa.depth_list))


def _static_subnet(model: nn.Module, arch: Arch) -> nn.Module:
    """The exported static subnet of ``arch`` with OFA's plain layers (and the supernet's head;
    the counts leave it out)."""
    net: Any = unwrap(model)  # an OFAMobileNetV3 (untyped)
    set_arch(net, arch)
    # preserve_weight=False: only the shapes matter for counting, so skip copying weights. The
    # subnet is thrown away after counting, so its layers are made plain in place, not copied.
    return make_plain(net.get_active_subnet(preserve_weight=False))


def counts(model: nn.Module, arch: Arch, image_size: int) -> tuple[int, int]:
    """:func:`count_params` and :func:`count_flops` of ``arch`` from one static subnet (building
    it is much of the cost of counting), both cached; sets ``arch`` active."""
    net = unwrap(model)
    params_key, flops_key = (_structure(net), arch, None), (_structure(net), arch, int(image_size))
    if params_key not in _COUNT_CACHE or flops_key not in _COUNT_CACHE:
        sub = _static_subnet(net, arch)
        _COUNT_CACHE[params_key] = headless_params(sub)
        # Counted on the exported static subnet: on the supernet, OFA's kernel transforms
        # (7x7 -> 5x5 -> 3x3 matmuls on the weights) would be counted as if they were inference.
        _COUNT_CACHE[flops_key] = headless_flops(sub, image_size)
    set_arch(net, arch)
    return _COUNT_CACHE[params_key], _COUNT_CACHE[flops_key]


def count_params(model: nn.Module, arch: Arch) -> int:
    """Parameters of the subnet ``arch`` without its classifier head (sets ``arch`` active)."""
    net = unwrap(model)
    key = (_structure(net), arch, None)
    if key not in _COUNT_CACHE:
        _COUNT_CACHE[key] = headless_params(_static_subnet(net, arch))
    set_arch(net, arch)
    return _COUNT_CACHE[key]


def count_flops(model: nn.Module, arch: Arch, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of one ``image_size`` image through ``arch`` without the head."""
    return counts(model, arch, image_size)[1]


def probe_batch(probe_size: int, image_size: int, seed: int) -> torch.Tensor:
    """The fixed Gaussian probe images ``probe_size x 3 x image_size x image_size`` for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(probe_size, 3, image_size, image_size, generator=gen)


def functional_embedding(model: nn.Module, arch: Arch, probe: torch.Tensor) -> np.ndarray:
    """Mean penultimate feature of ``arch`` over ``probe`` (eval mode, no grad), float32."""
    net = unwrap(model)
    set_arch(net, arch)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            feats = forward_features(net, probe.to(model_device(net)))
    finally:
        net.train(was_training)
    return feats.mean(dim=0).float().cpu().numpy().astype(np.float32)


def recalibrate_bn(model: nn.Module, arch: Arch, batches: Iterable) -> None:
    """Re-estimate every BatchNorm's running statistics for ``arch`` over ``batches``.

    ``batches`` yields float image tensors (or ``(images, labels)`` pairs). Statistics are reset
    and re-accumulated as an exact cumulative average (``momentum=None``), because the shared
    supernet statistics do not fit any particular subnet. Only the active channels are updated
    (OFA's dynamic BatchNorm slices the buffers); this changes the supernet's buffers.
    (:func:`tans.zoo.model_ops.recalibrate_bn_stats` on the supernet with ``arch`` active.)
    """
    net = unwrap(model)
    set_arch(net, arch)
    recalibrate_bn_stats(net, batches)


def evaluate(model: nn.Module, arch: Arch, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> float:
    """Top-1 accuracy of ``arch`` over ``(images, labels)`` batches (eval mode, no grad).

    ``precision="bf16"``: the forward passes run under bfloat16 autocast (logits cast to fp32).
    """
    net = unwrap(model)
    set_arch(net, arch)
    correct, total = top1_correct(net, batches, precision)
    if total == 0:
        raise ValueError("evaluate needs at least one test image")
    return correct / total


def measure_subnet(
    model: nn.Module,
    arch: Arch,
    bn_batches: Iterable,
    test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    image_size: int,
    probe: torch.Tensor,
    precision: str = "fp32",
) -> Measurement:
    """Recalibrate BatchNorm for ``arch``, then measure accuracy, size, FLOPs and ``f_emb``.

    The supernet's BatchNorm buffers are restored afterwards, so measuring many subnets (in any
    order) gives the same numbers as measuring each one alone; ``arch`` stays active.
    ``precision="bf16"`` runs the accuracy forward alone under bfloat16 autocast: the BatchNorm
    recalibration (outside autocast) and ``f_emb`` stay fp32.
    """
    net = unwrap(model)
    saved = {id(bn): [b.clone() for b in bn.buffers()] for bn in bn_layers(net)}
    try:
        recalibrate_bn(net, arch, bn_batches)  # fp32, never under autocast: the statistics stay exact
        accuracy = evaluate(net, arch, test_batches, precision)
        f_emb = functional_embedding(net, arch, probe)
    finally:
        with torch.no_grad():
            for bn in bn_layers(net):
                for buf, old in zip(bn.buffers(), saved[id(bn)]):
                    buf.copy_(old)
    n_params, flops = counts(net, arch, image_size)
    return Measurement(accuracy=accuracy, n_params=n_params, flops=flops, f_emb=f_emb)
