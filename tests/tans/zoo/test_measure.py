"""Subnet measurement: FLOPs and parameters, functional embedding, BatchNorm recalibration."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tans.zoo.measure import (
    count_flops,
    count_params,
    evaluate,
    flops_of,
    functional_embedding,
    measure_subnet,
    probe_batch,
    recalibrate_bn,
)
from tans.zoo.small_maps import fast_layout, plain_copy
from tans.zoo.subnets import Arch, largest, sample_archs, set_arch, smallest
from tans.zoo.supernets import forward_features, get_family

TINY = get_family("ofa_mbv3_tiny")


def _images(n: int, size: int = 32, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen) * 0.5 + shift


@pytest.mark.timeout(30)
def test_flop_counter_matches_a_hand_count():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8x8 outputs x 8 channels x (3*3*3) MACs
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise: 8x8 x 8 x 9 MACs
        nn.BatchNorm2d(8),  # elementwise: not counted
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),  # 512 x 10 MACs (the bias add is not counted)
    ).eval()
    macs = 64 * 8 * 27 + 64 * 8 * 9 + 512 * 10
    assert flops_of(model, torch.zeros(1, 3, 8, 8)) == 2 * macs


@pytest.mark.timeout(60)
def test_flop_tally_equals_pytorchs_flop_counter_on_subnets():
    """``flops_of`` sums FlopCounterMode's formulas without its module bookkeeping: same totals."""
    fam = get_family("ofa_mbv3_w1.0")
    model = fast_layout(fam.build(10))  # cropped depthwise layers and one-reduction SE included
    for i, a in enumerate([largest(fam), smallest(fam), *sample_archs(fam, 3, seed=1)[1:]]):
        size = (32, 48)[i % 2]
        sub = model_sizes_subnet(model, a)
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad(), FlopCounterMode(display=False) as reference:
            plain_copy(sub)(x)
        assert flops_of(sub, x) == reference.get_total_flops() > 0, a
        assert count_flops(model, a, size) == headless_reference(sub, size), a


def model_sizes_subnet(model: nn.Module, arch: Arch) -> nn.Module:
    set_arch(model, arch)
    return model.get_active_subnet(preserve_weight=False).eval()


def headless_reference(sub: nn.Module, size: int) -> int:
    """FlopCounterMode on the plain static subnet without its head (the zoo's definition)."""
    plain = plain_copy(sub)
    plain.classifier = nn.Identity()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


@pytest.mark.timeout(60)
def test_counts_grow_with_depth_and_expand_ratio():
    fam = get_family("ofa_mbv3_w1.0")
    model = fam.build(10)

    def arch(ks, e, d):
        return Arch(ks=(ks,) * 20, e=(e,) * 20, d=(d,) * 5)

    params = {key: count_params(model, arch(*key)) for key in [(3, 3, 2), (3, 3, 4), (3, 6, 2), (7, 6, 4)]}
    flops = {key: count_flops(model, arch(*key), 48) for key in params}
    assert params[(3, 3, 2)] < params[(3, 3, 4)] and params[(3, 3, 2)] < params[(3, 6, 2)]
    assert flops[(3, 3, 2)] < flops[(3, 3, 4)] and flops[(3, 3, 2)] < flops[(3, 6, 2)]
    big = largest(fam)
    assert params[(7, 6, 4)] == count_params(model, big)
    assert all(count_params(model, a) < params[(7, 6, 4)] for a in sample_archs(fam, 6, seed=0)[1:])
    assert count_flops(model, big, 32) < count_flops(model, big, 48)
    # The head is not counted: the same arch with 1000 classes has the same numbers.
    model_1000 = fam.build(1000)
    assert count_params(model_1000, smallest(fam)) == count_params(model, smallest(fam))
    headless = sum(p.numel() for n, p in model.named_parameters()
                   if not n.startswith("classifier.") and "matrix" not in n)  # supernet params at max
    assert params[(7, 6, 4)] == headless
    assert model.runtime_depth == [2] * 5  # counting leaves the counted arch active


@pytest.mark.timeout(60)
def test_functional_embedding_shape_and_determinism():
    torch.manual_seed(0)
    model = TINY.build(4)
    recalibrate_bn(model, largest(TINY), [_images(16, seed=s) for s in range(2)])
    probe = probe_batch(8, 32, seed=0)
    assert torch.equal(probe, probe_batch(8, 32, seed=0)) and not torch.equal(probe, probe_batch(8, 32, seed=1))
    emb = functional_embedding(model, largest(TINY), probe)
    assert emb.dtype == np.float32 and emb.shape == (TINY.penultimate_dim,)
    again = functional_embedding(model, largest(TINY), probe_batch(8, 32, seed=0))
    assert np.array_equal(emb, again)
    clone = TINY.build(4)
    clone.load_state_dict(model.state_dict())
    assert np.array_equal(functional_embedding(clone, largest(TINY), probe), emb)
    assert not np.allclose(functional_embedding(model, smallest(TINY), probe), emb)


@pytest.mark.timeout(60)
def test_bn_recalibration_sets_stats_and_unflattens_features():
    torch.manual_seed(0)
    model = TINY.build(4)
    arch = smallest(TINY)
    probe = probe_batch(8, 32, seed=0)
    set_arch(model, arch)
    model.eval()
    with torch.no_grad():
        before = forward_features(model, probe)
    bn = model.first_conv.bn
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    recalibrate_bn(model, arch, [(_images(16, seed=s, shift=1.0), None) for s in range(3)])
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1  # momentum restored
    assert not model.training
    with torch.no_grad():
        after = forward_features(model, probe)
    # Fresh statistics give near-constant features; recalibrated ones separate the images.
    assert after.std(dim=0).mean() > 100 * before.std(dim=0).mean()
    assert after.std(dim=0).mean() > 1e-3
    # Cumulative average: the running mean of the first conv's BN equals the mean over all batches.
    data = torch.cat([_images(16, seed=s, shift=1.0) for s in range(3)])
    with torch.no_grad():
        conv_out = model.first_conv.conv(data)
    assert torch.allclose(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)


@pytest.mark.timeout(60)
def test_measure_subnet_is_order_independent_and_restores_bn():
    torch.manual_seed(0)
    model = TINY.build(3)
    bn_batches = [_images(16, seed=s) for s in range(2)]
    test = [(_images(32, seed=10), torch.arange(32) % 3)]
    probe = probe_batch(8, 32, seed=0)
    a, b = sample_archs(TINY, 3, seed=0)[1:]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    first = measure_subnet(model, a, bn_batches, test, 32, probe)
    measure_subnet(model, b, bn_batches, test, 32, probe)
    again = measure_subnet(model, a, bn_batches, test, 32, probe)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert first.accuracy == again.accuracy and 0.0 <= first.accuracy <= 1.0
    assert np.array_equal(first.f_emb, again.f_emb) and first.f_emb.shape == (TINY.penultimate_dim,)
    assert (first.n_params, first.flops) == (count_params(model, a), count_flops(model, a, 32))
    assert evaluate(model, a, test) >= 0.0


@pytest.mark.timeout(120)
def test_measurement_costs_little_more_than_its_forward_passes():
    torch.manual_seed(0)
    model = TINY.build(10)
    arch = sample_archs(TINY, 3, seed=0)[2]
    bn_batches = [_images(64, seed=s) for s in range(2)]
    test = [(_images(128, seed=10 + s), torch.arange(128) % 10) for s in range(2)]

    def bare() -> float:
        set_arch(model, arch)
        start = time.perf_counter()
        with torch.no_grad():
            model.train()
            for x in bn_batches:
                model(x)
            model.eval()
            for x, _ in test:
                model(x)
        return time.perf_counter() - start

    def measured() -> float:
        start = time.perf_counter()
        recalibrate_bn(model, arch, bn_batches)
        evaluate(model, arch, test)
        return time.perf_counter() - start

    bare(), measured()  # warm-up
    bare_s, measured_s = [], []
    for _ in range(4):  # interleaved, best of each: robust to another job on the cores
        bare_s.append(bare())
        measured_s.append(measured())
    assert min(measured_s) / min(bare_s) <= 1.3
