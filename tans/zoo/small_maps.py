"""Depthwise convolutions that skip the part of their kernel that only ever sees padding.

At the zoo's image sizes (32-64 px) the last stages of an OFA-MobileNetV3 run on 2x2 to 3x3
feature maps, with depthwise kernels up to 7x7 and "same" padding. A stride-1 convolution on an
``H x W`` map can reach at most ``H - 1`` rows and ``W - 1`` columns away from an output pixel;
the rest of a larger kernel multiplies zero padding. Cropping the kernel to its central
``(2H-1) x (2W-1)`` window (and the padding with it) gives the same output, and the cropped-away
weights get the zero gradient they would have got anyway. On CPU, PyTorch's depthwise backward
pays for the full kernel: cropping makes a training step of the largest subnet at 48 px about a
quarter cheaper, and an inference forward about a third, without changing what is computed.
Storing the weights channels-last (NHWC, which oneDNN's CPU convolutions prefer) saves about as
much again; both are measured by ``bench/zoo_build.py``.

:func:`crop_depthwise_kernels` switches a model's depthwise layers, in place, to the cropping
forward: OFA's elastic ``DynamicSeparableConv2d`` (supernets) and plain depthwise ``nn.Conv2d``
with "same" padding (exported subnets). Parameters, buffers and state dicts are untouched.
:func:`fast_layout` does that and stores the weights channels-last: every supernet
(:meth:`tans.zoo.supernets.SupernetFamily.build`) and every extracted subnet gets it, unless
``TANS_FAST_LAYOUT=0`` is set (then the layers stay as OFA builds them).
"""

from __future__ import annotations

import functools
import os
from copy import deepcopy

import torch
import torch.nn.functional as F
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicSeparableConv2d
from torch import nn


def _crop(weight: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``weight`` cropped to what a stride-1 "same" conv on ``height x width`` can reach, and its padding."""
    kh, kw = weight.shape[-2:]
    reach_h, reach_w = min(kh // 2, height - 1), min(kw // 2, width - 1)
    ch, cw = kh // 2 - reach_h, kw // 2 - reach_w
    if ch or cw:
        weight = weight[:, :, ch : kh - ch, cw : kw - cw]
    return weight, (reach_h, reach_w)


# When gradients flow, maps of at most this many pixels go through depthwise_as_matmul on the
# CPU: PyTorch's depthwise convolution backward is slow there on tiny maps, the matmul's is not
# (a training step of sampled subnets at 48 px ~12 % cheaper; 6x6 maps measured no better than
# 4x4). Without gradients the convolution's forward is the faster of the two and is kept.
MATMUL_MAX_PIXELS = 16


@functools.lru_cache(maxsize=64)
def _toeplitz_index(height: int, width: int, kh: int, kw: int) -> torch.Tensor:
    """``[q, p]`` -> index into a flattened ``kh x kw`` kernel (``kh*kw`` = out of its reach)."""
    ph, pw = kh // 2, kw // 2
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    i, j = i.flatten(), j.flatten()
    dy, dx = i[None, :] - i[:, None], j[None, :] - j[:, None]  # input p minus output q
    inside = (dy.abs() <= ph) & (dx.abs() <= pw)
    return torch.where(inside, (dy + ph) * kw + (dx + pw), torch.full_like(dy, kh * kw))


def depthwise_as_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A stride-1, "same"-padded depthwise convolution as one batched matmul over channels.

    On an ``H x W`` map each channel's convolution is a linear map of its ``HW`` pixels, whose
    ``HW x HW`` matrix holds that channel's kernel weights (and zeros beyond the kernel's reach).
    For the tiny maps of the last stages that matmul costs a fraction of the convolution.
    """
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    flat = torch.cat([weight.reshape(c, kh * kw), weight.new_zeros(c, 1)], dim=1)
    matrix = flat[:, _toeplitz_index(h, w, kh, kw).to(x.device)]  # [c, q, p]
    return torch.einsum("ncp,cqp->ncq", x.reshape(n, c, h * w), matrix).reshape(n, c, h, w)


def _depthwise_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Stride-1 "same" depthwise convolution of ``x``, by the cheapest exact route for its map."""
    weight, padding = _crop(weight, x.shape[-2], x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and x.device.type == "cpu" and x.shape[-2] * x.shape[-1] <= MATMUL_MAX_PIXELS:
        y = depthwise_as_matmul(x, weight)
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    return F.conv2d(x, weight, bias, 1, padding, 1, groups)


class CroppedDepthwiseConv2d(nn.Conv2d):
    """A depthwise, stride-1, "same"-padded ``nn.Conv2d`` whose kernel is cropped to the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise_same(x, self.weight, self.bias, self.groups)


class CroppedSeparableConv2d(DynamicSeparableConv2d):
    """OFA's elastic depthwise convolution, cropped to the map when its stride is 1."""

    def forward(self, x: torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
        if self.stride != 1 or self.dilation != 1:
            return super().forward(x, kernel_size)
        kernel_size = kernel_size or self.active_kernel_size
        in_channel = x.size(1)
        filters = self.get_active_filter(in_channel, kernel_size).contiguous()
        return _depthwise_same(x, filters, None, in_channel)


def _is_same_padded_depthwise(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:
        return False
    kh, kw = m.kernel_size
    return (m.groups == m.in_channels == m.out_channels and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.padding == (kh // 2, kw // 2) and kh % 2 == 1 and kw % 2 == 1 and m.padding_mode == "zeros")


def crop_depthwise_kernels(model: nn.Module) -> nn.Module:
    """Switch ``model``'s depthwise convolutions to the cropping forward, in place; returns ``model``."""
    for m in model.modules():
        if type(m) is DynamicSeparableConv2d and type(m.conv) is nn.Conv2d:  # not weight-standardised
            m.__class__ = CroppedSeparableConv2d
        elif _is_same_padded_depthwise(m):
            m.__class__ = CroppedDepthwiseConv2d
    return model


def fast_layout(model: nn.Module) -> nn.Module:
    """Crop ``model``'s depthwise kernels to their maps and store its weights channels-last, in place.

    Values are unchanged (state dicts load into it and come out of it as before, only with NHWC
    strides); inputs may stay NCHW: the first convolution's output follows its weights' layout.
    """
    if os.environ.get("TANS_FAST_LAYOUT", "1") == "0":  # the plain layers (bench/zoo_build.py's baseline)
        return model
    crop_depthwise_kernels(model)
    return model.to(memory_format=torch.channels_last)


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with OFA's plain depthwise layers (``model`` itself if it has no others).

    FLOPs are counted on it: the zoo's convention counts every kernel weight, as the exported
    network computes it, whatever this module skips.
    """
    if not any(isinstance(m, (CroppedDepthwiseConv2d, CroppedSeparableConv2d)) for m in model.modules()):
        return model
    plain: dict[type[nn.Module], type[nn.Module]] = {
        CroppedDepthwiseConv2d: nn.Conv2d, CroppedSeparableConv2d: DynamicSeparableConv2d}
    copy = deepcopy(model)
    for m in copy.modules():
        cls = plain.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return copy
