"""Mixed precision (``precision: bf16``): bfloat16 autocast around forwards, everything else fp32.

Runs on the CPU (torch's CPU autocast supports bfloat16) with the tiny family: the fp32 default is
bit-identical to the plain code, bf16 runs and lands near fp32, and weights, gradients and
BatchNorm running statistics stay fp32.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from tans.config import ConfigError
from tans.data.reader import TaskTensors, iter_batches, to_float
from tans.job_configs import load_job_config
from tans.selection.finetune import build_candidate, evaluate_accuracy, finetune, split_train_val, subset
from tans.zoo.elastic import autocast, finetune_for_task, make_optimizer, sandwich_step, train_supernet
from tans.zoo.measure import evaluate, measure_subnet, probe_batch
from tans.zoo.subnets import largest, random_arch, set_arch, smallest
from tans.zoo.supernets import get_family

TINY = get_family("ofa_mbv3_tiny")


def _task(n: int, classes: int = 3, seed: int = 0) -> TaskTensors:
    gen = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    labels = torch.randperm(n, generator=gen) % classes
    means = palette[:classes].float()[labels][:, :, None, None]
    images = (torch.randn(n, 3, 32, 32, generator=gen) * 50 + means).clamp(0, 255).round().to(torch.uint8)
    return TaskTensors(images=images, labels=labels, num_classes=classes)


def _model(classes: int = 3, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TINY.build(classes)


def _batch(n: int = 8, seed: int = 0):
    data = _task(n, seed=seed)
    return to_float(data.images), data.labels


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "running_" in n}


def _assert_fp32(model) -> None:
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is None or p.grad.dtype == torch.float32, name
    for name, b in _bn_buffers(model).items():
        assert b.dtype == torch.float32 and torch.isfinite(b).all(), name


def _reference_sandwich(model, images, labels, optimizer, rng, random_subnets=1) -> float:
    """The sandwich step as it was before the precision option: plain fp32 forwards."""
    archs = [largest(TINY), smallest(TINY)] + [random_arch(TINY, rng) for _ in range(random_subnets)]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for arch in archs:
        set_arch(model, arch)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    set_arch(model, archs[0])
    return total / len(archs)


@pytest.mark.timeout(30)
def test_fp32_sandwich_step_is_bit_identical_to_the_plain_step():
    images, labels = _batch()
    ref, new, default = _model(), _model(), _model()
    losses = []
    for model, step in ((ref, _reference_sandwich), (new, None), (default, None)):
        opt = make_optimizer(model, 0.05)
        for i in range(2):  # the second step also covers the momentum buffers
            rng = random.Random(7 + i)
            if step is not None:
                losses.append(step(model, images, labels, opt, rng))
            elif model is new:
                losses.append(sandwich_step(model, images, labels, opt, TINY, rng, precision="fp32"))
            else:
                losses.append(sandwich_step(model, images, labels, opt, TINY, rng))
    assert losses[0:2] == losses[2:4] == losses[4:6]
    for (name, a), b, c in zip(ref.state_dict().items(), new.state_dict().values(), default.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name


@pytest.mark.timeout(30)
def test_disabled_autocast_forward_and_fp32_eval_equal_a_direct_call():
    images, labels = _batch(24, seed=3)
    model = _model().eval()
    with torch.no_grad():
        direct = model(images)
        with autocast("cpu", "fp32"):
            wrapped = model(images)
        assert wrapped.dtype == torch.float32 and torch.equal(direct, wrapped)
        expected = int((direct.argmax(1) == labels).sum()) / len(labels)
    arch = largest(TINY)
    assert evaluate(model, arch, [(images, labels)], precision="fp32") == expected
    assert evaluate(model, arch, [(images, labels)]) == expected


@pytest.mark.timeout(30)
def test_bf16_sandwich_step_runs_under_autocast_and_keeps_fp32_state():
    images, labels = _batch(16, seed=1)
    init, fp32, bf16 = _model(), _model(), _model()
    seen = []
    bf16.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss32 = sandwich_step(fp32, images, labels, make_optimizer(fp32, 0.05), TINY, random.Random(0))
    loss16 = sandwich_step(bf16, images, labels, make_optimizer(bf16, 0.05), TINY, random.Random(0), precision="bf16")
    assert seen and all(d == torch.bfloat16 for d in seen)  # the forwards really ran in bf16
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)
    _assert_fp32(bf16)
    # the update goes the same way as fp32's, up to bf16 rounding of the forwards (loose: random init)
    p0 = torch.cat([p.detach().flatten() for p in init.parameters()])
    d32 = torch.cat([p.detach().flatten() for p in fp32.parameters()]) - p0
    d16 = torch.cat([p.detach().flatten() for p in bf16.parameters()]) - p0
    assert float(F.cosine_similarity(d32, d16, dim=0)) > 0.8


@pytest.mark.timeout(30)
def test_bf16_supernet_training_and_task_finetune():
    data = _task(24, seed=2)
    model = _model()
    out = train_supernet(model, data, TINY, steps=2, batch_size=12, lr=0.05, seed=0, precision="bf16")
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    _assert_fp32(model)
    ft, metrics = finetune_for_task(model.state_dict(), TINY, 3, data, steps=1, batch_size=12, lr=0.02, seed=0,
                                    precision="bf16")
    ref, ref_metrics = finetune_for_task(model.state_dict(), TINY, 3, data, steps=1, batch_size=12, lr=0.02, seed=0)
    assert all(math.isfinite(x) for x in metrics["losses"])
    assert metrics["losses"] == pytest.approx(ref_metrics["losses"], rel=0.05)
    _assert_fp32(ft)
    with pytest.raises(ValueError, match="precision"):
        train_supernet(_model(), data, TINY, steps=1, batch_size=12, lr=0.05, seed=0, precision="fp16")


@pytest.mark.timeout(30)
def test_bf16_measurement_keeps_recalibration_and_f_emb_fp32():
    train, test = _task(64, seed=4), _task(48, seed=5)
    model = _model()
    before = {n: b.clone() for n, b in _bn_buffers(model).items()}
    bn = [to_float(x) for x, _ in iter_batches(train, 32, drop_last=True)]
    tests = [(to_float(x), y) for x, y in iter_batches(test, 24)]
    probe = probe_batch(8, 32, 0)
    arch = smallest(TINY)
    m32 = measure_subnet(model, arch, bn, tests, 32, probe)
    m16 = measure_subnet(model, arch, bn, tests, 32, probe, precision="bf16")
    # f_emb depends on the recalibrated statistics: equal bits mean the recalibration stayed fp32
    assert m16.f_emb.dtype == m32.f_emb.dtype and (m16.f_emb == m32.f_emb).all()
    assert (m16.n_params, m16.flops) == (m32.n_params, m32.flops)
    assert 0.0 <= m16.accuracy <= 1.0 and abs(m16.accuracy - m32.accuracy) <= 0.1
    for name, b in _bn_buffers(model).items():  # restored, fp32
        assert b.dtype == torch.float32 and torch.equal(b, before[name]), name


@pytest.mark.timeout(30)
def test_bf16_candidate_finetune_is_close_to_fp32_and_fp32_is_unchanged():
    data = _task(36, seed=6)
    train_idx, val_idx = split_train_val(data.labels, 1 / 3, seed=0)
    train, val, test = subset(data, train_idx), subset(data, val_idx), _task(24, seed=7)
    base = build_candidate("ofa_mbv3_tiny", largest(TINY), 3, None, seed=0)
    runs = {}
    for key, kwargs in (("default", {}), ("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"})):
        model = copy.deepcopy(base)
        runs[key] = (model, finetune(model, train, val, test, 1, 12, 0.02, seed=0, **kwargs))
    (m0, r0), (m1, r1), (m2, r2) = runs["default"], runs["fp32"], runs["bf16"]
    assert r0.train_loss == r1.train_loss and r0.val_accuracy == r1.val_accuracy
    for (name, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(math.isfinite(x) for x in r2.train_loss)
    assert r2.train_loss == pytest.approx(r1.train_loss, rel=0.1)
    assert all(0.0 <= a <= 1.0 for a in r2.val_accuracy + r2.test_accuracy)
    _assert_fp32(m2)
    acc16 = evaluate_accuracy(m2, test, precision="bf16")
    assert abs(acc16 - evaluate_accuracy(m2, test)) <= 0.1


@pytest.mark.timeout(30)
def test_precision_in_configs_and_fingerprints(tmp_path):
    from jobs.search import search_fingerprint

    zoo = load_job_config("zoo", "configs/zoo/tiny.yaml", ["pretrain.precision=bf16", "measure.precision=bf16"])
    assert (zoo.pretrain.precision, zoo.finetune.precision, zoo.measure.precision) == ("bf16", "fp32", "bf16")
    with pytest.raises(ConfigError, match="finetune.precision"):
        load_job_config("zoo", "configs/zoo/tiny.yaml", ["finetune.precision=fp16"])
    with pytest.raises(ConfigError, match="precision"):
        load_job_config("search", "configs/search/tiny.yaml", ["precision=half"])
    info = {"uri": "file:///x/spaces/s", "zoo": "z", "created_at": "t", "files": ""}
    fp32 = search_fingerprint(load_job_config("search", "configs/search/tiny.yaml"), "t", info)
    bf16 = search_fingerprint(load_job_config("search", "configs/search/tiny.yaml", ["precision=bf16"]), "t", info)
    assert "precision" not in fp32["settings"]  # runs recorded before the option still match
    assert bf16["settings"]["precision"] == "bf16" and bf16 != fp32
