"""Sandwich-rule supernet training and per-task fine-tuning on a tiny synthetic task."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tans.data.reader import TaskTensors, iter_batches
from tans.zoo.elastic import cosine_lr, finetune_for_task, make_optimizer, sandwich_step, train_supernet
from tans.zoo.measure import evaluate, recalibrate_bn
from tans.zoo.subnets import largest, smallest
from tans.zoo.supernets import get_family

TINY = get_family("ofa_mbv3_tiny")


def colour_noise_task(n: int, classes: int = 4, size: int = 32, seed: int = 0) -> TaskTensors:
    """Each class is a colour (one of a few RGB means) under heavy per-pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    palette = torch.tensor(
        [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200], [200, 40, 200]]
    )
    labels = torch.randperm(n, generator=gen) % classes
    means = palette[:classes].float()[labels][:, :, None, None]
    images = (torch.randn(n, 3, size, size, generator=gen) * 60 + means).clamp(0, 255).to(torch.uint8)
    return TaskTensors(images=images, labels=labels, num_classes=classes)


def _accuracy(model, data: TaskTensors, train: TaskTensors, arch) -> float:
    recalibrate_bn(model, arch, [x for x, _ in iter_batches(train, 64)][:4])
    return evaluate(model, arch, iter_batches(data, 128))


@pytest.mark.timeout(30)
def test_cosine_lr_schedule():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0)
    assert cosine_lr(0, 100, 0.1, warmup_steps=10) == pytest.approx(0.01)
    assert cosine_lr(9, 100, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 0.1, warmup_steps=10) == pytest.approx(0.05)
    lrs = [cosine_lr(s, 100, 0.1, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and not math.isnan(sum(lrs))


@pytest.mark.timeout(30)
def test_optimizer_skips_weight_decay_on_bn_and_bias():
    model = TINY.build(4)
    opt = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0 and decay["nesterov"]
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.first_conv.bn.weight) in ids and id(model.classifier.linear.bias) in ids
    assert id(model.first_conv.conv.weight) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.timeout(30)
def test_sandwich_step_updates_and_leaves_largest_active():
    torch.manual_seed(0)
    model = TINY.build(4)
    data = colour_noise_task(16)
    x, y = next(iter_batches(data, 16))
    opt = make_optimizer(model, lr=0.1)
    before = model.blocks[1].conv.point_linear.conv.conv.weight.clone()
    loss = sandwich_step(model, x, y, opt, TINY, random.Random(0), random_subnets=2)
    assert math.isfinite(loss) and loss > 0
    assert not torch.equal(before, model.blocks[1].conv.point_linear.conv.conv.weight)
    assert model.runtime_depth == [TINY.max_depth] * 5
    assert all(model.blocks[i].conv.active_kernel_size == 5 for i in range(1, len(model.blocks)))


@pytest.mark.timeout(120)
def test_train_supernet_learns_a_tiny_task():
    torch.manual_seed(0)
    train, test = colour_noise_task(384, seed=0), colour_noise_task(256, seed=1)
    model = TINY.build(4)
    chance = 1 / 4
    logged, epochs = [], []
    result = train_supernet(model, train, TINY, steps=30, batch_size=32, lr=0.05, seed=0,
                            log=lambda step, m: logged.append((step, m)),
                            on_epoch_end=lambda epoch, step, epochs=epochs: epochs.append((epoch, step)))
    losses = result["losses"]
    assert result["steps"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert [s for s, _ in logged] == list(range(1, 31)) and logged[-1][1]["lr"] < logged[0][1]["lr"]
    assert epochs == [(0, 12), (1, 24), (2, 30)]  # 384 // 32 = 12 steps per epoch, last one partial
    assert _accuracy(model, test, train, largest(TINY)) > chance + 0.4
    assert _accuracy(model, test, train, smallest(TINY)) > chance + 0.2


class _Killed(Exception):
    pass


@pytest.mark.timeout(60)
def test_resumed_training_matches_an_uninterrupted_run():
    data = colour_noise_task(48, seed=2)  # 3 steps per epoch at batch 16
    kwargs = dict(data=data, family=TINY, steps=5, batch_size=16, lr=0.05, seed=3)
    torch.manual_seed(0)
    whole = TINY.build(4)
    resumed = TINY.build(4)
    resumed.load_state_dict(whole.state_dict())

    full = train_supernet(whole, **kwargs)

    def crash_after_4(step, metrics):
        if step == 4:
            raise _Killed

    opt = make_optimizer(resumed, 0.05)
    with pytest.raises(_Killed):
        train_supernet(resumed, optimizer=opt, log=crash_after_4, **kwargs)
    # Restart mid-epoch 1 with the state of step 4 (here: the same objects, as a checkpoint would hold).
    rest = train_supernet(resumed, optimizer=opt, start_step=4, **kwargs)
    assert rest["steps"] == 5 and rest["losses"] == pytest.approx(full["losses"][4:], rel=1e-5)
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-5), key


@pytest.mark.timeout(90)
def test_finetune_for_task_with_another_number_of_classes():
    torch.manual_seed(0)
    base_data, task = colour_noise_task(192, classes=4, seed=4), colour_noise_task(192, classes=3, seed=5)
    base = TINY.build(4)
    train_supernet(base, base_data, TINY, steps=4, batch_size=32, lr=0.05, seed=0)
    base_state = {"state_dict": base.state_dict()}

    # No steps: the body is the base's, the head is new and sized for the task.
    start, metrics = finetune_for_task(base_state, TINY, 3, task, steps=0, batch_size=32, lr=0.05, seed=1)
    assert metrics["loaded"] == len(base.state_dict()) - 2 and metrics["steps"] == 0
    for key, value in base.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(start.state_dict()[key], value), key
    assert start.classifier.linear.weight.shape == (3, TINY.penultimate_dim)

    model, metrics = finetune_for_task(base_state, TINY, 3, task, steps=12, batch_size=32, lr=0.05, seed=1)
    assert model.classifier.linear.out_features == 3 and metrics["steps"] == 12
    assert sum(metrics["losses"][-3:]) < sum(metrics["losses"][:3])
    assert _accuracy(model, colour_noise_task(128, classes=3, seed=6), task, largest(TINY)) > 1 / 3 + 0.2
    assert model.runtime_depth == [TINY.max_depth] * 5


@pytest.mark.timeout(30)
def test_train_supernet_rejects_a_task_smaller_than_a_batch():
    with pytest.raises(ValueError, match="lower batch_size"):
        train_supernet(TINY.build(4), colour_noise_task(10), TINY, steps=1, batch_size=8, lr=0.1, seed=0, world_size=2)


@pytest.mark.timeout(30)
def test_uneven_shards_take_the_same_number_of_steps_per_epoch():
    data = colour_noise_task(15)  # rank 0 holds 8 images (2 batches of 4), rank 1 holds 7 (1 batch)
    steps = {}
    for rank in (0, 1):
        epochs = []
        train_supernet(TINY.build(4), data, TINY, steps=5, batch_size=4, lr=0.01, seed=0, rank=rank, world_size=2,
                       on_epoch_end=lambda epoch, step, epochs=epochs: epochs.append((epoch, step)))
        steps[rank] = epochs
    assert steps[0] == steps[1] == [(epoch, epoch + 1) for epoch in range(5)]


@pytest.mark.timeout(60)
def test_train_supernet_warms_the_learning_rate_up_then_follows_the_cosine():
    data = colour_noise_task(48, seed=2)  # 3 steps per epoch at batch 16
    lrs: list[float] = []
    torch.manual_seed(0)
    train_supernet(TINY.build(4), data, TINY, steps=6, batch_size=16, lr=0.04, seed=3, warmup_steps=3,
                   log=lambda step, info: lrs.append(info["lr"]))
    assert lrs == pytest.approx([0.04 / 3, 0.08 / 3, 0.04, *(cosine_lr(s, 6, 0.04, 3) for s in (3, 4, 5))])
    assert lrs[3] == pytest.approx(0.04) and lrs[2] == lrs[3]  # the warm-up ends at the peak the cosine starts from


def test_pretrain_fingerprint_names_a_warm_up_only_when_there_is_one():
    from jobs.pretrain_supernet import weight_settings
    from tans.job_configs import PretrainConfig

    default = weight_settings(PretrainConfig())
    assert "warmup_epochs" not in default and "precision" not in default and "max_failures" not in default
    assert {"epochs", "lr", "images_per_task"} <= set(default)  # bases recorded before stay resumable
    assert weight_settings(PretrainConfig(warmup_epochs=1.0))["warmup_epochs"] == 1.0
