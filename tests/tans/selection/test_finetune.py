"""Fine-tuning a retrieved candidate: splits, building from zoo weights, training, resuming, sizes."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from tans.data.reader import iter_batches, to_float
from tans.selection.finetune import (
    build_candidate,
    build_structure,
    evaluate_accuracy,
    evaluate_accuracy_loss,
    extract_features,
    features,
    finetune,
    model_size,
    recalibrate_bn,
    split_train_val,
    subset,
)
from tans.zoo.elastic import cosine_lr
from tans.zoo.measure import count_flops, count_params
from tans.zoo.subnets import largest, sample_archs, set_arch, smallest
from tans.zoo.supernets import SupernetError, forward_features, get_family

from . import TINY, colour_task, trained_like_supernet

FAM = get_family(TINY)


def _task(seed: int = 1):
    data = colour_task(72, seed=seed)
    train_idx, val_idx = split_train_val(data.labels, 1 / 3, seed=0)
    return subset(data, train_idx), subset(data, val_idx), colour_task(30, seed=seed + 100)


def _save_supernet(tmp_path, model) -> str:
    path = tmp_path / "supernets" / "z" / "tasks" / "t" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.timeout(30)
def test_split_train_val_is_stratified_and_deterministic():
    counts = {0: 10, 1: 5, 2: 2, 3: 1, 4: 3}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    labels = labels[np.random.default_rng(7).permutation(len(labels))]
    train, val = split_train_val(labels, 0.3, seed=0)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert len(set(train) & set(val)) == 0 and sorted(np.r_[train, val]) == list(range(len(labels)))
    for cls, n in counts.items():
        n_val = int((labels[val] == cls).sum())
        n_train = int((labels[train] == cls).sum())
        if n >= 2:
            assert n_val >= 1 and n_train >= 1, cls
            assert n_val == min(n - 1, max(1, round(n * 0.3))), cls
        else:
            assert (n_val, n_train) == (0, 1)
    again = split_train_val(torch.as_tensor(labels), 0.3, seed=0)  # a tensor works the same
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = split_train_val(labels, 0.3, seed=1)
    assert not np.array_equal(other[1], val)
    # A large val fraction still leaves every class one training image.
    train9, val9 = split_train_val(labels, 0.9, seed=0)
    assert set(labels[train9]) == set(counts) and set(labels[val9]) == {0, 1, 2, 4}
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError):
            split_train_val(labels, bad, seed=0)


@pytest.mark.timeout(60)
def test_build_candidate_extracts_the_task_supernets_subnet(tmp_path):
    supernet = trained_like_supernet(num_classes=5).eval()
    uri = _save_supernet(tmp_path, supernet)
    arch = sample_archs(FAM, 3, seed=2)[2]
    rng_before = torch.random.get_rng_state()
    cand = build_candidate(TINY, arch, num_classes=3, weights_uri=uri, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert not hasattr(cand, "runtime_depth")  # a standalone network, not a supernet
    assert cand.classifier.linear.out_features == 3
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    set_arch(supernet, arch)
    with torch.no_grad():
        expected = forward_features(supernet, x)
        got = features(cand.eval(), x)
        assert cand(x).shape == (6, 3)
    assert got.shape == (6, FAM.penultimate_dim)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(cand.first_conv.bn.running_var, supernet.first_conv.bn.running_var)
    # The same seed gives the same network; the head comes from the seed, not the checkpoint.
    again = build_candidate(TINY, arch, 3, uri, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(cand.state_dict().values(), again.state_dict().values()))
    other_seed = build_candidate(TINY, arch, 3, uri, seed=1)
    assert not torch.equal(other_seed.classifier.linear.weight, cand.classifier.linear.weight)
    assert torch.equal(other_seed.first_conv.conv.weight, cand.first_conv.conv.weight)
    # Scratch: same structure and head, a different (random) body.
    scratch = build_candidate(TINY, arch, 3, None, seed=0).eval()
    assert list(scratch.state_dict()) == list(cand.state_dict())
    assert torch.equal(scratch.classifier.linear.weight, cand.classifier.linear.weight)
    assert not torch.equal(scratch.first_conv.conv.weight, cand.first_conv.conv.weight)
    with torch.no_grad():
        assert not torch.allclose(features(scratch, x), got, atol=1e-3)
    # The weight-free structure takes the candidate's state dict exactly.
    bare = build_structure(TINY, arch, 3)
    bare.load_state_dict(cand.state_dict())
    with torch.no_grad():
        assert torch.equal(bare.eval()(x), cand(x))


@pytest.mark.timeout(60)
def test_build_candidate_errors_are_one_line(tmp_path):
    good = trained_like_supernet()
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in good.state_dict().items() if k.startswith("first_conv.")}, partial)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (dict(family_name="resnet", weights_uri=None), SupernetError, "resnet"),
        (dict(weights_uri=str(tmp_path / "nope.pt")), SupernetError, "nope.pt"),
        (dict(weights_uri=str(corrupt)), SupernetError, "weights-only"),
        (dict(weights_uri=str(partial)), SupernetError, "missing"),
        (dict(arch=largest(get_family("ofa_mbv3_w1.0")), weights_uri=None), ValueError, "does not fit"),
    ]
    for overrides, kind, needle in cases:
        kwargs = dict(family_name=TINY, arch=smallest(FAM), num_classes=3, seed=0) | overrides
        with pytest.raises(kind) as err:
            build_candidate(**kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value), overrides


@pytest.mark.timeout(60)
def test_model_size_equals_the_zoo_measurements():
    supernet = FAM.build(5)
    for arch in sample_archs(FAM, 4, seed=3) + [largest(FAM)]:
        sub = build_structure(TINY, arch, num_classes=3)
        sub.train()
        assert model_size(sub, 32) == (count_params(supernet, arch), count_flops(supernet, arch, 32)), arch
        assert sub.training and sub.classifier.linear.out_features == 3  # left as it was
    small = model_size(build_structure(TINY, smallest(FAM), 3), 32)
    big = model_size(build_structure(TINY, largest(FAM), 3), 32)
    assert small[0] < big[0] and small[1] < big[1]
    # The head is not counted: 3 or 50 classes give the same numbers.
    assert model_size(build_structure(TINY, smallest(FAM), 50), 32) == small


@pytest.mark.timeout(60)
def test_finetune_learns_a_separable_task_and_anneals_per_step():
    train, val, test = _task()
    model = build_candidate(TINY, smallest(FAM), 3, None, seed=0)
    before = evaluate_accuracy(model, val)
    seen = []

    def on_epoch(epoch, metrics, net, optimizer):
        seen.append((epoch, dict(metrics)))
        assert net is model and optimizer.param_groups[0]["lr"] == metrics["lr"]

    result = finetune(model, train, val, test, epochs=5, batch_size=16, lr=0.1, seed=0, on_epoch=on_epoch)
    assert before < 0.6 and result.val_accuracy[-1] >= 0.9 and result.test_accuracy[-1] >= 0.8
    assert len(result.val_accuracy) == len(result.test_accuracy) == len(result.train_loss) == 5
    assert result.train_loss[-1] < 0.5 * result.train_loss[0]
    assert result.val_accuracy[-1] == evaluate_accuracy(model, val) and model.training
    # the validation loss, per epoch, is the mean cross-entropy over the split (computed here by hand)
    with torch.no_grad():
        model.eval()
        images, labels = next(iter_batches(val, len(val)))  # one batch: the whole split, as the model sees it
        by_hand = float(torch.nn.functional.cross_entropy(model(images), labels))
        model.train()
    assert len(result.val_loss) == 5 and abs(result.val_loss[-1] - by_hand) < 1e-4
    assert result.val_loss[-1] < result.val_loss[0] and seen[-1][1]["val_loss"] == result.val_loss[-1]
    assert evaluate_accuracy_loss(model, val) == (result.val_accuracy[-1], result.val_loss[-1])
    # One cosine over all 5 x 3 steps (not restarted each epoch), down to ~0 at the last step.
    assert (result.steps_per_epoch, result.total_steps, len(result.lrs)) == (3, 15, 15)
    assert result.lrs == [cosine_lr(s, 15, 0.1) for s in range(15)]
    assert result.lrs[0] == pytest.approx(0.1) and 0 < result.lrs[-1] < 0.002
    assert all(a > b for a, b in zip(result.lrs, result.lrs[1:]))
    assert [e for e, _ in seen] == [0, 1, 2, 3, 4] and result.epochs == [0, 1, 2, 3, 4]
    last = seen[-1][1]
    assert last["epochs_done"] == 5 and last["steps"] == 15 and last["val_accuracy"] == result.val_accuracy[-1]
    assert last["test_accuracy"] == result.test_accuracy[-1] and last["lr"] == result.lrs[-1]
    assert result.seconds > 0 and result.best_epoch in result.epochs
    feats = extract_features(model, test)
    assert feats.shape == (len(test), FAM.penultimate_dim) and feats.dtype == np.float32


@pytest.mark.timeout(60)
def test_small_train_sets_never_give_batchnorm_a_batch_of_one():
    _, val, _ = _task()
    tiny = colour_task(5, seed=3)
    model = build_candidate(TINY, smallest(FAM), 3, None, seed=0)
    res = finetune(model, tiny, val, None, epochs=2, batch_size=16, lr=0.05, seed=0)
    assert (res.batch_size, res.steps_per_epoch, len(res.lrs)) == (5, 1, 2) and res.test_accuracy == []
    odd = colour_task(17, seed=4)  # 16 + 1: the single leftover image is dropped, not trained on
    res = finetune(model, odd, val, None, epochs=1, batch_size=16, lr=0.05, seed=0)
    assert (res.batch_size, res.steps_per_epoch) == (16, 1)
    with pytest.raises(ValueError, match="at least 2 training images"):
        finetune(model, colour_task(1), val, None, epochs=1, batch_size=16, lr=0.05, seed=0)


@pytest.mark.timeout(60)
def test_resumed_finetune_equals_an_uninterrupted_one():
    train, val, _ = _task(seed=5)
    arch = sample_archs(FAM, 3, seed=0)[2]

    def fresh():  # dropout in the head: resuming must reproduce its random masks too
        return build_candidate(TINY, arch, 3, None, seed=3, dropout=0.3)

    kwargs = dict(train=train, val=val, test=None, epochs=4, batch_size=16, lr=0.1, seed=11)
    straight = fresh()
    full = finetune(straight, **kwargs)

    saved = {}

    def stop_after_two(epoch, metrics, net, optimizer):
        # What a Tune trainable checkpoints: state dicts, serialised and read back weights-only.
        buf = io.BytesIO()
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": metrics["epochs_done"]}
        torch.save(state, buf)
        saved["ckpt"] = buf.getvalue()
        return metrics["epochs_done"] == 2

    first = finetune(fresh(), **kwargs, on_epoch=stop_after_two)
    assert first.stopped_early and first.epochs == [0, 1] and first.val_accuracy == full.val_accuracy[:2]
    ckpt = torch.load(io.BytesIO(saved["ckpt"]), weights_only=True)
    resumed_model = build_structure(TINY, arch, 3, dropout=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # another process, another global RNG state: no effect on the run
        rest = finetune(resumed_model, **kwargs, start_epoch=int(ckpt["epoch"]), model_state=ckpt["model"],
                        optimizer_state=ckpt["optimizer"])
    assert rest.epochs == [2, 3] and not rest.stopped_early
    assert rest.val_accuracy == full.val_accuracy[2:] and rest.train_loss == full.train_loss[2:]
    assert first.lrs + rest.lrs == full.lrs
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    # Without the optimizer state (momentum lost) the result differs: the test can tell.
    no_opt = finetune(build_structure(TINY, arch, 3, dropout=0.3), **kwargs, start_epoch=2, model_state=ckpt["model"])
    assert no_opt.train_loss != full.train_loss[2:]


@pytest.mark.timeout(60)
def test_recalibrated_batchnorm_fixes_lagging_running_statistics():
    train, val, _ = _task()
    model = build_candidate(TINY, smallest(FAM), 3, None, seed=0)
    finetune(model, train, val, None, epochs=3, batch_size=16, lr=0.1, seed=0, bn_images=0)
    lagging = evaluate_accuracy(model, val)
    snapshot = copy.deepcopy(model.state_dict())
    used = recalibrate_bn(model, train, batch_size=16)
    assert used == 48 and model.training
    recalibrated = evaluate_accuracy(model, val)
    assert recalibrated > lagging and recalibrated >= 0.9
    # Recalibration changes BatchNorm buffers only, and exactly reproduces itself.
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed and all(k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    first = copy.deepcopy(model.state_dict())
    recalibrate_bn(model, train, batch_size=16)
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    # A capped recalibration draws its images at random (data is often sorted by class).
    assert recalibrate_bn(model, train, batch_size=16, max_images=20) == 16
    assert not torch.equal(model.first_conv.bn.running_mean, first["first_conv.bn.running_mean"])
    recalibrate_bn(model, train, batch_size=16)
    # The statistics are the exact per-channel batch averages of the first layer's conv output.
    with torch.no_grad():
        conv = model.first_conv.conv
        outs = [conv(to_float(train.images[i : i + 16])) for i in range(0, 48, 16)]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    torch.testing.assert_close(model.first_conv.bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert not math.isnan(float(model.first_conv.bn.running_var.sum()))
