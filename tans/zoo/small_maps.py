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
much again; both are measured by ``bench/zoo_build.py``. When gradients flow, depthwise layers on
maps of at most 6x6 (strided ones included: a strided "same" convolution is the stride-1 one
sampled every s-th pixel) run as a matmul instead (:data:`MATMUL_MAX_PIXELS`), 1x1
convolutions on those maps too (with or without gradients), the squeeze-and-excitation
blocks average their maps in one reduction instead of two, and the hard swish and sigmoid run as
PyTorch's one-kernel activations.

:func:`crop_depthwise_kernels` switches a model's depthwise layers, in place, to the cropping
forward: OFA's elastic ``DynamicSeparableConv2d`` (supernets) and plain depthwise ``nn.Conv2d``
with "same" padding (exported subnets), OFA's squeeze-and-excitation blocks to theirs, and 1x1
stride-1 convolutions (elastic or plain) to :func:`_pointwise`.
Parameters, buffers and state dicts are untouched.
:func:`fast_layout` does that and stores the weights channels-last: every supernet
(:meth:`tans.zoo.supernets.SupernetFamily.build`) and every extracted subnet gets it, unless
``TANS_FAST_LAYOUT=0`` is set (then the layers stay as OFA builds them).
"""

from __future__ import annotations

import functools
import os
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicConv2d, DynamicSE, DynamicSeparableConv2d
from ofa.utils import MyNetwork, make_divisible
from ofa.utils.layers import SEModule
from ofa.utils.pytorch_modules import Hsigmoid, Hswish
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
# CPU: PyTorch's depthwise convolution backward is slow there on small maps, the matmul's is not.
# Forward + backward at batch 64 on one core (ms): 240 channels 6x6 k7 68 -> 23; 672 channels
# 3x3 k7 stride 2 104 -> 23; 240 channels 6x6 k7 stride 2 49 -> 13; at 12x12 the convolution wins
# (55 vs 96). Without gradients the convolution's forward is the faster one and is kept.
MATMUL_MAX_PIXELS = 36


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
    # Channels first and contiguous, so that bmm runs one strided batched GEMM, forward and
    # backward. On the strided view of a channels-last x (what einsum passed it) the CPU bmm
    # falls back to one select, copy and mm per channel: 1.3-4x slower on these maps.
    pixels = x.reshape(n, c, h * w).transpose(0, 1).contiguous()  # [c, n, p]
    return torch.bmm(pixels, matrix.transpose(1, 2)).transpose(0, 1).reshape(n, c, h, w)


def _depthwise_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                    stride: int = 1) -> torch.Tensor:
    """A "same"-padded (``k // 2``) depthwise convolution of ``x``, by the cheapest exact route for its map.

    With ``stride`` s, the output is the stride-1 convolution's at every s-th row and column
    (pixel ``(i, j)`` is centred on input ``(s*i, s*j)`` either way), so on the maps the matmul
    route takes, a strided convolution is that route and a slice.
    """
    height, width = x.shape[-2:]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and x.device.type == "cpu" and height * width <= MATMUL_MAX_PIXELS:
        y = depthwise_as_matmul(x, _crop(weight, height, width)[0])
        if stride > 1:
            y = y[:, :, ::stride, ::stride]
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    if stride > 1:
        kh, kw = weight.shape[-2:]
        return F.conv2d(x, weight, bias, stride, (kh // 2, kw // 2), 1, groups)
    weight, padding = _crop(weight, height, width)
    return F.conv2d(x, weight, bias, 1, padding, 1, groups)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1, stride-1 convolution; on small channels-last maps, as the matmul it is.

    oneDNN's CPU convolution is slow on the maps of the last layers: on a 1x1 map (the
    squeeze-and-excitation blocks, ``feature_mix_layer``) 960 -> 1280 channels at batch 64 takes
    22 ms forward + backward against 3 ms as a matmul; 1.2-1.6x on the 2x2 to 6x6 maps; at 12x12
    and larger the convolution is as fast or faster and is kept.
    """
    height, width = x.shape[-2:]
    if x.device.type == "cpu" and height * width <= MATMUL_MAX_PIXELS and (
        height * width == 1 or x.is_contiguous(memory_format=torch.channels_last)
    ):
        # NHWC rows times the weight: the result comes back channels-last, as the convolution's would.
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-1 ``nn.Conv2d`` that runs as a matmul on small maps (:func:`_pointwise`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(x, self.weight, self.bias)


class PointwiseDynamicConv2d(DynamicConv2d):
    """OFA's elastic 1x1 convolution (active channels sliced as OFA slices them), as a matmul on small maps."""

    def forward(self, x: torch.Tensor, out_channel: int | None = None) -> torch.Tensor:
        out_channel = out_channel or self.active_out_channel
        return _pointwise(x, self.get_active_filter(out_channel, x.size(1)), None)


class CroppedDepthwiseConv2d(nn.Conv2d):
    """A depthwise, "same"-padded ``nn.Conv2d`` whose kernel is cropped to the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise_same(x, self.weight, self.bias, self.groups, self.stride[0])


class CroppedSeparableConv2d(DynamicSeparableConv2d):
    """OFA's elastic depthwise convolution, cropped to the map (strided or not)."""

    def forward(self, x: torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
        if self.dilation != 1:
            return super().forward(x, kernel_size)
        kernel_size = kernel_size or self.active_kernel_size
        in_channel = x.size(1)
        filters = self.get_active_filter(in_channel, kernel_size).contiguous()
        return _depthwise_same(x, filters, None, in_channel, self.stride)


# OFA's squeeze-and-excitation blocks average a map with x.mean(3).mean(2): two reductions, the
# first over the strided axis of a channels-last tensor, 10-40x slower on CPU than one
# x.mean((2, 3)) (the same mean up to float rounding, ~1e-7). Measuring a subnet spent ~14 % of its
# time there.
def _squeeze(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


class OneReductionSE(SEModule):
    """OFA's static squeeze-and-excitation block, averaging the map in one reduction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(_squeeze(x))


class OneReductionDynamicSE(DynamicSE):
    """OFA's elastic squeeze-and-excitation block (active channels sliced as OFA slices them),
    averaging the map in one reduction."""

    def forward(self, x: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        in_channel = x.size(1)
        num_mid = make_divisible(in_channel // self.reduction, divisor=MyNetwork.CHANNEL_DIVISIBLE)
        y = _pointwise(_squeeze(x), self.get_active_reduce_weight(num_mid, in_channel, groups=groups),
                       self.get_active_reduce_bias(num_mid))
        y = _pointwise(self.fc.relu(y), self.get_active_expand_weight(num_mid, in_channel, groups=groups),
                       self.get_active_expand_bias(in_channel, groups=groups))
        return x * self.fc.h_sigmoid(y)


# OFA writes its hard activations as x * relu6(x + 3) / 6: four elementwise passes forward and as
# many saved tensors for backward. PyTorch's own kernels compute the same forward values (bit for
# bit on float32 and float64; gradients within float32 rounding) in one pass, 4-5x faster forward
# + backward on CPU.
class OneKernelHswish(Hswish):
    """OFA's hard swish as PyTorch's one-kernel ``F.hardswish``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)


class OneKernelHsigmoid(Hsigmoid):
    """OFA's hard sigmoid as PyTorch's one-kernel ``F.hardsigmoid``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)


# OFA's layer type -> the fast one, for the layers every instance of whose type switches.
_FAST_OF: dict[type[nn.Module], type[nn.Module]] = {
    SEModule: OneReductionSE, DynamicSE: OneReductionDynamicSE, Hswish: OneKernelHswish, Hsigmoid: OneKernelHsigmoid}
# The same for the 1x1 convolutions, which switch only in the shapes _is_pointwise accepts.
_POINTWISE_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: PointwiseConv2d, DynamicConv2d: PointwiseDynamicConv2d}


def _is_same_padded_depthwise(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:
        return False
    kh, kw = m.kernel_size
    return (m.groups == m.in_channels == m.out_channels and m.stride[0] == m.stride[1] and m.dilation == (1, 1)
            and m.padding == (kh // 2, kw // 2) and kh % 2 == 1 and kw % 2 == 1 and m.padding_mode == "zeros")


def _is_pointwise(m: nn.Module) -> bool:
    if type(m) is DynamicConv2d:
        elastic: Any = m  # OFA's module: its settings are untyped attributes
        return bool(type(elastic.conv) is nn.Conv2d and elastic.kernel_size == 1 and elastic.stride == 1
                    and elastic.dilation == 1)
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def crop_depthwise_kernels(model: nn.Module) -> nn.Module:
    """Switch ``model``'s depthwise convolutions to the cropping forward, in place; returns ``model``.

    Its squeeze-and-excitation blocks switch to the one-reduction average as well, its 1x1
    convolutions to the matmul on small maps, and its hard activations to PyTorch's kernels.
    """
    for m in model.modules():
        if type(m) is DynamicSeparableConv2d and type(m.conv) is nn.Conv2d:  # not weight-standardised
            m.__class__ = CroppedSeparableConv2d
        elif _is_same_padded_depthwise(m):
            m.__class__ = CroppedDepthwiseConv2d
        elif type(m) in _FAST_OF:
            m.__class__ = _FAST_OF[type(m)]
        elif _is_pointwise(m):
            m.__class__ = _POINTWISE_OF[type(m)]
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


# Every fast layer type -> OFA's plain one (the inverse of the switches above).
_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    CroppedDepthwiseConv2d: nn.Conv2d, CroppedSeparableConv2d: DynamicSeparableConv2d,
    **{fast: plain for table in (_FAST_OF, _POINTWISE_OF) for plain, fast in table.items()}}


def make_plain(model: nn.Module) -> nn.Module:
    """Swap ``model``'s layers back to OFA's plain ones, in place (values unchanged); returns it."""
    for m in model.modules():
        cls = _PLAIN.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with OFA's plain depthwise layers (``model`` itself if it has no others).

    FLOPs are counted on it: the zoo's convention counts every kernel weight, as the exported
    network computes it, whatever this module skips.
    """
    if not any(type(m) in _PLAIN for m in model.modules()):
        return model
    return make_plain(deepcopy(model))
