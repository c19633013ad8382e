"""Depthwise kernels cropped to their maps, the matmul route and channels-last: same numbers as OFA's layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicConv2d, DynamicSeparableConv2d
from ofa.utils.pytorch_modules import Hsigmoid, Hswish
from torch import nn

from tans.selection.finetune import build_candidate, model_size
from tans.zoo.measure import count_flops, flops_of
from tans.zoo.small_maps import (
    CroppedDepthwiseConv2d,
    CroppedSeparableConv2d,
    OneKernelHsigmoid,
    OneKernelHswish,
    OneReductionDynamicSE,
    OneReductionSE,
    PointwiseConv2d,
    PointwiseDynamicConv2d,
    _depthwise_same,
    _pointwise,
    crop_depthwise_kernels,
    depthwise_as_matmul,
    plain_copy,
)
from tans.zoo.subnets import largest, sample_archs, set_arch, smallest
from tans.zoo.supernets import get_family


def _plain_and_fast(family_name: str, monkeypatch, num_classes: int = 5):
    family = get_family(family_name)
    monkeypatch.setenv("TANS_FAST_LAYOUT", "0")
    torch.manual_seed(0)
    plain = family.build(num_classes)
    monkeypatch.delenv("TANS_FAST_LAYOUT")
    fast = family.build(num_classes)
    fast.load_state_dict(plain.state_dict())
    return family, plain, fast


def _assert_same_outputs_and_gradients(route, x, weight, stride: int = 1):
    """``route(x, weight)`` against PyTorch's "same"-padded depthwise convolution, forward and backward."""
    k = weight.shape[-1]
    want = F.conv2d(x, weight, None, stride, k // 2, 1, x.shape[1])
    got = route(x, weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad(want.square().sum(), (x, weight))
    g_got = torch.autograd.grad(got.square().sum(), (x, weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _inputs(h: int, w: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 6, h, w, generator=gen, requires_grad=True),
            torch.randn(6, 1, k, k, generator=gen, requires_grad=True))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("h", "w", "k"), [(3, 3, 7), (2, 2, 5), (2, 3, 7), (1, 1, 3), (4, 4, 3), (6, 5, 7)])
def test_matmul_route_is_the_convolution(h, w, k):
    _assert_same_outputs_and_gradients(depthwise_as_matmul, *_inputs(h, w, k, h * 100 + w * 10 + k))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("h", "k", "stride"), [(3, 7, 2), (3, 5, 2), (6, 7, 2), (5, 3, 2), (6, 7, 1), (12, 7, 2)])
def test_every_route_of_a_same_padded_depthwise_conv_is_the_convolution(h, k, stride):
    # h <= 6: the matmul route (and a slice when strided); 12: the convolution
    _assert_same_outputs_and_gradients(lambda x, w: _depthwise_same(x, w, None, 6, stride),
                                       *_inputs(h, h, k, h * 100 + k * 10 + stride), stride=stride)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("family_name", "size"), [("ofa_mbv3_w1.0", 48), ("ofa_mbv3_tiny", 32), ("ofa_mbv3_tiny", 40)])
def test_supernet_outputs_and_gradients_are_unchanged(family_name, size, monkeypatch):
    family, plain, fast = _plain_and_fast(family_name, monkeypatch)
    assert any(type(m) is CroppedSeparableConv2d for m in fast.modules())
    assert not any(type(m) is CroppedSeparableConv2d for m in plain.modules())
    assert any(type(m) is OneReductionDynamicSE for m in fast.modules())
    assert not any(type(m) is OneReductionDynamicSE for m in plain.modules())
    for kind in (PointwiseDynamicConv2d, PointwiseConv2d, OneKernelHswish, OneKernelHsigmoid):
        assert any(type(m) is kind for m in fast.modules())
        assert not any(type(m) is kind for m in plain.modules())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.ndim == 4)
    # In float64 the only difference left, rounding order, is ~1e-15 in the outputs; train-mode
    # BatchNorm's backward amplifies it to ~1e-8 in the gradients (of magnitude ~1). Any real
    # change shows as ~1e-2.
    plain, fast = plain.double(), fast.double()
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    for arch in [largest(family), smallest(family), *sample_archs(family, 2, 3)]:
        for net in (plain, fast):
            set_arch(net, arch)
            net.zero_grad()
            net.train()
        out_plain, out_fast = plain(x), fast(x)
        torch.testing.assert_close(out_fast, out_plain, rtol=1e-9, atol=1e-9)
        F.cross_entropy(out_plain, y).backward()
        F.cross_entropy(out_fast, y).backward()
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            if p.grad is None:
                assert q.grad is None or not q.grad.any(), name
                continue
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
        with torch.no_grad():
            plain.eval(), fast.eval()
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-9, atol=1e-9)


@pytest.mark.timeout(120)
def test_extracted_subnet_is_cropped_and_counts_like_the_zoo(tmp_path, monkeypatch):
    family, plain, _ = _plain_and_fast("ofa_mbv3_tiny", monkeypatch)
    weights = tmp_path / "supernet.pt"
    torch.save(plain.state_dict(), weights)
    arch = largest(family)
    fast_sub = build_candidate("ofa_mbv3_tiny", arch, 4, str(weights), seed=0)
    monkeypatch.setenv("TANS_FAST_LAYOUT", "0")
    plain_sub = build_candidate("ofa_mbv3_tiny", arch, 4, str(weights), seed=0)
    assert any(type(m) is CroppedDepthwiseConv2d for m in fast_sub.modules())
    assert not any(type(m) is CroppedDepthwiseConv2d for m in plain_sub.modules())
    assert any(type(m) is OneReductionSE for m in fast_sub.modules())
    assert not any(type(m) is OneReductionSE for m in plain_sub.modules())
    assert any(type(m) is PointwiseConv2d for m in fast_sub.modules())
    assert not any(type(m) is PointwiseConv2d for m in plain_sub.modules())
    # State dicts are interchangeable: same keys, same values.
    sd_fast, sd_plain = fast_sub.state_dict(), plain_sub.state_dict()
    assert sd_fast.keys() == sd_plain.keys()
    assert all(torch.equal(sd_fast[k], sd_plain[k]) for k in sd_plain)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast_sub.eval()(x), plain_sub.eval()(x), rtol=1e-4, atol=1e-4)
    # FLOPs count every kernel weight, as the zoo's rows do, cropped or not.
    assert model_size(fast_sub, 32) == model_size(plain_sub, 32)
    assert model_size(fast_sub, 32)[1] == count_flops(plain, arch, 32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("side", "channels_last"), [(1, False), (2, True), (6, True), (3, False), (12, True)])
def test_pointwise_route_is_the_convolution(side, channels_last):
    # <= 36 pixels, channels-last (or a 1x1 map): the matmul; otherwise (and at 12x12) the convolution
    gen = torch.Generator().manual_seed(side)
    x = torch.randn(4, 6, side, side, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(5, 6, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    want, got = F.conv2d(x, weight, bias), _pointwise(x, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if channels_last:  # the next layer gets the layout the convolution would have given it
        assert got.is_contiguous(memory_format=torch.channels_last)
    g_want = torch.autograd.grad(want.square().sum(), (x, weight, bias))
    g_got = torch.autograd.grad(got.square().sum(), (x, weight, bias))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ofa_kind", "one_kernel"), [(Hswish, OneKernelHswish), (Hsigmoid, OneKernelHsigmoid)])
def test_one_kernel_activations_are_ofas_bit_for_bit(ofa_kind, one_kernel, dtype):
    # Around and exactly at the kinks (-3 and 3) too.
    x = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 5,
                   torch.tensor([-3.0, 3.0, 0.0, -3.5, 3.5], dtype=dtype)]).requires_grad_()
    ofa_act, fast_act = ofa_kind(), ofa_kind()
    fast_act.__class__ = one_kernel
    want, got = ofa_act(x), fast_act(x)
    assert torch.equal(got, want)
    (g_want,), (g_got,) = torch.autograd.grad(want.square().sum(), x), torch.autograd.grad(got.square().sum(), x)
    inside = (x.detach().abs() - 3).abs() > 1e-6  # the kinks' subgradients are a convention
    torch.testing.assert_close(g_got[inside], g_want[inside], rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(30)
def test_only_stride_one_same_padded_depthwise_layers_switch():
    model = nn.Sequential(  # on a 3x3 input
        nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False),  # switches (cropped to 5x5)
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False),  # strided "same": switches (-> 2x2)
        nn.Conv2d(8, 16, 3, padding=1),  # not depthwise: stays
        nn.Conv2d(16, 16, 3, padding=2, groups=16),  # not "same": stays (-> 4x4)
        DynamicSeparableConv2d(16, [3, 5, 7], stride=1),  # switches
        nn.Conv2d(16, 12, 1),  # 1x1: the matmul on small maps
        DynamicConv2d(12, 12),  # elastic 1x1: the matmul on small maps
        nn.Conv2d(12, 12, 1, stride=2),  # strided 1x1: stays
    )
    before = flops_of(model, torch.zeros(1, 8, 3, 3))
    reference = copy.deepcopy(model)
    crop_depthwise_kernels(model)
    kinds = [type(m) for m in model]
    assert kinds == [CroppedDepthwiseConv2d, CroppedDepthwiseConv2d, nn.Conv2d, nn.Conv2d, CroppedSeparableConv2d,
                     PointwiseConv2d, PointwiseDynamicConv2d, nn.Conv2d]
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert flops_of(model, torch.zeros(1, 8, 3, 3)) == before
    assert [type(m) for m in plain_copy(model)] == [type(m) for m in reference]
