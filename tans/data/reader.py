"""Read a task split as tensors for training and evaluation (plain PyTorch, no Ray).

Images are decoded once into a ``uint8`` tensor (``N x C x H x W``) - small CPU-sized tasks fit in
memory many times over - and batches are cut from it, optionally shuffled with a seed and sharded
by rank so each DDP worker sees a disjoint slice. Grey images are repeated to 3 channels when
``channels=3``: the supernets are RGB networks. The Ray Data path that shards a task over train
workers lives in :mod:`jobs.runtime`, outside the Ray-free library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from tans.data.tasks import decode_png, read_split, read_task_info
from tans.storage import Storage

# Inputs are scaled to [-1, 1]: a fixed normalisation that needs no per-dataset statistics,
# so a new dataset at search time is normalised exactly like the zoo's tasks.
MEAN, STD = 0.5, 0.5


@dataclass
class TaskTensors:
    """A decoded split: ``images`` uint8 ``N x C x H x W``, ``labels`` int64 ``N``."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def decode_images(pngs: list[bytes], image_size: int, channels: int = 3) -> torch.Tensor:
    """Decode PNG bytes to a ``uint8`` tensor ``N x channels x image_size x image_size``."""
    src_channels = 1 if channels == 1 else None
    arrays = []
    for data in pngs:
        arr = decode_png(data, channels=src_channels)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        arrays.append(arr)
    if not arrays:
        return torch.zeros((0, channels, image_size, image_size), dtype=torch.uint8)
    # Tasks store one size per task, so a stack is safe; resizing happens once, in float.
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if batch.shape[1] == 1 and channels == 3:
        batch = batch.expand(-1, 3, -1, -1)
    elif batch.shape[1] == 3 and channels == 1:
        batch = batch.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
        resized = F.interpolate(
            batch.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
        batch = resized.round().clamp(0, 255).to(torch.uint8)
    return batch.contiguous()


def load_task_tensors(storage: Storage, task: str, split: str, image_size: int, channels: int = 3) -> TaskTensors:
    """Decode one split of ``task`` at ``image_size`` px with ``channels`` channels."""
    return load_task_rows(storage, task, split, image_size, None, channels)


def load_task_rows(storage: Storage, task: str, split: str, image_size: int,
                   pick: Callable[[int], torch.Tensor] | None, channels: int = 3) -> TaskTensors:
    """Like :func:`load_task_tensors`, decoding only the rows ``pick(n_rows)`` names, in that order.

    Decoding dominates loading, so a caller that needs 128 of 3,400 images pays for 128; the
    images are exactly those :func:`load_task_tensors` would give at the same rows.
    """
    info = read_task_info(storage, task)
    table = read_split(storage, task, split)
    if pick is not None:
        table = table.take(pa.array(pick(table.num_rows).numpy()))
    images = decode_images(table.column("image").to_pylist(), image_size, channels)
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
    return TaskTensors(images=images, labels=labels, num_classes=info.num_classes)


def shuffled_order(n: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """The permutation of ``n`` rows that :func:`iter_batches` uses for ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to normalised float32 (the network's input)."""
    return (images.float() / 255.0 - MEAN) / STD


def iter_batches(
    data: TaskTensors,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(float images, labels)`` batches of this rank's shard.

    With ``shuffle`` the order is a permutation seeded by ``(seed, epoch)``, identical on every
    rank, so the shards stay disjoint. ``drop_last`` avoids a final batch of 1, which
    BatchNorm cannot train on.
    """
    n = len(data)
    order = shuffled_order(n, seed, epoch) if shuffle else torch.arange(n)
    shard = order[rank::world_size]
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield to_float(data.images[idx]), data.labels[idx]
