"""Tests of fine-tuning, export and LogME (helpers shared by the test modules below)."""

from __future__ import annotations

import torch

from tans.data.reader import TaskTensors
from tans.zoo.supernets import get_family

TINY = "ofa_mbv3_tiny"
PALETTE = [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200], [200, 40, 200]]


def colour_task(n: int, classes: int = 3, size: int = 32, seed: int = 0, noise: float = 50.0) -> TaskTensors:
    """Each class is one RGB colour under per-pixel Gaussian noise (separable, not trivially so)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % classes
    means = torch.tensor(PALETTE[:classes]).float()[labels][:, :, None, None]
    images = (torch.randn(n, 3, size, size, generator=gen) * noise + means).clamp(0, 255).round().to(torch.uint8)
    return TaskTensors(images=images, labels=labels, num_classes=classes)


def trained_like_supernet(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A tiny supernet whose every float tensor (BatchNorm statistics included) has distinctive values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_family(TINY).build(num_classes)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or "matrix" in name:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            else:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.05)
    return model
