"""Frozen feature extractors that turn a dataset sample into a *query* (features + labels).

A query is N images per class of a task's train split, seeded, passed through a frozen
extractor. Two extractors exist:

* ``supernet`` (the default): the largest subnet of the zoo's base supernet. It needs no
  download and sees images exactly as the zoo's networks do (same size, same [-1, 1] scaling).
* ``resnet18``: a torchvision ResNet-18 from a checkpoint URI (TANS used an ImageNet ResNet-18);
  images are resized to ``image_size`` and normalised with ImageNet statistics.

The same code encodes the zoo's tasks (``jobs/extract_queries.py``) and a brand-new dataset at
search and serving time, so a query is always made the same way. No ``import ray`` here.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from tans import paths
from tans.data.reader import TaskTensors, decode_images, to_float
from tans.data.tasks import read_split, read_task_info
from tans.storage import Storage

EXTRACTOR_KINDS = ("supernet", "resnet18")
QUERY_SCHEMA = pa.schema([("label", pa.int64()), ("feature", pa.list_(pa.float32()))])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExtractorError(ValueError):
    """A feature extractor that cannot be built (unknown kind, unreadable checkpoint)."""


@dataclass
class ExtractorSpec:
    """What a space's queries are made with; stored in ``space.json`` so consumers rebuild it."""

    kind: str = "supernet"
    uri: str = ""  # checkpoint URI (absolute path or s3://); for `supernet` the zoo's base supernet
    family: str = ""  # supernet family (kind `supernet` only)
    image_size: int = 48
    name: str = ""  # folder under <root>/queries/; derived from the checkpoint when empty
    sha256: str = ""  # the checkpoint's content hash when the space was trained; checked on every build

    def __post_init__(self):
        if self.kind not in EXTRACTOR_KINDS:
            raise ExtractorError(f"extractor kind {self.kind!r} is not one of {', '.join(EXTRACTOR_KINDS)}")
        if not self.name:
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:8]
            self.name = f"{self.kind}-{self.family + '-' if self.family else ''}{self.image_size}px-{digest}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExtractorSpec:
        return cls(**{k: data[k] for k in ("kind", "uri", "family", "image_size", "name", "sha256") if k in data})


class FeatureExtractor(nn.Module):
    """uint8 images ``N x C x H x W`` (any size, 1 or 3 channels) -> float features ``N x D``."""

    def __init__(self, spec: ExtractorSpec, body: nn.Module, feature_dim: int, forward_fn, normalise):
        super().__init__()
        self.spec = spec
        self.body = body.eval()
        self.feature_dim = int(feature_dim)
        self._forward_fn = forward_fn
        self._normalise = normalise
        for p in self.body.parameters():
            p.requires_grad_(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ExtractorError(f"images must be N x C x H x W with C in (1, 3), got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = images.float()
        size = self.spec.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
        return self._normalise(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        out = []
        device = next(self.body.parameters()).device
        for start in range(0, images.shape[0], batch_size):
            x = self.prepare(images[start : start + batch_size]).to(device)
            out.append(self._forward_fn(self.body, x).float().cpu())
        if not out:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(out)


def _supernet_extractor(spec: ExtractorSpec) -> FeatureExtractor:
    from tans.zoo.subnets import largest, set_arch
    from tans.zoo.supernets import forward_features, get_family, load_initial_weights

    if not spec.family:
        raise ExtractorError("a supernet extractor needs its family")
    family = get_family(spec.family)
    model = family.build(num_classes=2)  # the head is never run: features stop before it
    if spec.uri:
        load_initial_weights(model, spec.uri)
    set_arch(model, largest(family))
    model.eval()

    def normalise(x):  # the zoo's own input scaling (tans.data.reader.to_float)
        return to_float(x)

    return FeatureExtractor(spec, model, family.penultimate_dim, forward_features, normalise)


def _resnet18_extractor(spec: ExtractorSpec) -> FeatureExtractor:
    import io

    import torchvision

    from tans.zoo.supernets import SupernetError, _read_checkpoint_bytes

    model = torchvision.models.resnet18(weights=None)
    if not spec.uri:
        raise ExtractorError("a resnet18 extractor needs a checkpoint URI (extractor.uri)")
    try:
        raw = _read_checkpoint_bytes(spec.uri)
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except SupernetError as exc:
        raise ExtractorError(str(exc)) from None
    except Exception as exc:  # a file that is not a torch checkpoint
        raise ExtractorError(f"{spec.uri}: not a readable state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a tensor of the wrong shape
        raise ExtractorError(f"{spec.uri}: not a ResNet-18 state dict (tensor shapes differ)") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ExtractorError(
            f"{spec.uri}: not a ResNet-18 state dict (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    model.fc = nn.Identity()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def normalise(x):
        return (x / 255.0 - mean.to(x.device)) / std.to(x.device)

    return FeatureExtractor(spec, model, 512, lambda body, x: body(x), normalise)


def build_extractor(spec: ExtractorSpec, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The frozen extractor described by ``spec``, in eval mode on ``device``."""
    builder = {"supernet": _supernet_extractor, "resnet18": _resnet18_extractor}[spec.kind]
    if spec.sha256 and spec.uri:
        check_lineage(spec)
    return builder(spec).to(device)


def checkpoint_sha256(uri: str) -> str:
    """The sha256 of a checkpoint's bytes (local path or s3://)."""
    from tans.zoo.supernets import SupernetError, _read_checkpoint_bytes

    try:
        return hashlib.sha256(_read_checkpoint_bytes(uri)).hexdigest()
    except SupernetError as exc:
        raise ExtractorError(str(exc)) from None


def check_lineage(spec: ExtractorSpec) -> None:
    """Refuse an extractor checkpoint that changed since the space was trained on its features.

    A space's query encoder only understands the features of the exact weights it was trained
    with; a re-pretrained base supernet (``build-zoo --force``) would silently give wrong answers.
    """
    try:
        found = checkpoint_sha256(spec.uri)
    except ExtractorError as exc:
        raise ExtractorError(f"{str(exc).splitlines()[0]} - the space's extractor is gone (was its zoo rebuilt?): "
                             "retrain the space with `tans train-space --config CFG --force`") from None
    if found != spec.sha256:
        raise ExtractorError(f"{spec.uri}: the extractor checkpoint changed since the space was trained "
                             f"(sha256 {found[:12]}, the space expects {spec.sha256[:12]}): retrain the space with "
                             "`tans train-space --config CFG --force`")


def sample_per_class(labels, per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` row indices of each class, seeded, in sorted order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        picked.append(rng.choice(rows, size=min(per_class, rows.size), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def query_from_tensors(extractor: FeatureExtractor, data: TaskTensors, per_class: int, seed: int):
    """(features N x D float32 numpy, labels N int64 numpy) for a sample of ``data``."""
    rows = sample_per_class(data.labels.numpy(), per_class, seed)
    features = extractor(data.images[torch.from_numpy(rows)])
    return features.numpy().astype(np.float32), data.labels.numpy()[rows].astype(np.int64)


def task_query(extractor: FeatureExtractor, storage: Storage, task: str, per_class: int, seed: int):
    """The query of a stored task: a seeded sample of its train split through the extractor."""
    info = read_task_info(storage, task)
    table = read_split(storage, task, "train")
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False))
    rows = sample_per_class(labels, per_class, seed)
    pngs = table.column("image").take(pa.array(rows)).to_pylist()
    images = decode_images(pngs, extractor.spec.image_size, channels=3 if info.channels == 3 else 1)
    features = extractor(images)
    return features.numpy().astype(np.float32), labels[rows].astype(np.int64)


def query_path(extractor_name: str, task: str) -> str:
    return paths.query_file(extractor_name, task)


def query_table(features: np.ndarray, labels: np.ndarray) -> pa.Table:
    feats = pa.array(list(np.asarray(features, dtype=np.float32)), type=pa.list_(pa.float32()))
    return pa.table({"label": pa.array(np.asarray(labels, dtype=np.int64)), "feature": feats}, schema=QUERY_SCHEMA)


def write_query(storage: Storage, extractor_name: str, task: str, features, labels) -> str:
    rel = query_path(extractor_name, task)
    storage.write_parquet(rel, query_table(features, labels))
    return rel


def read_query(storage: Storage, extractor_name: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    table = storage.read_parquet(query_path(extractor_name, task))
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    feats = table.column("feature").combine_chunks()
    dim = len(feats[0]) if len(feats) else 0
    features = np.array(feats.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    return features, labels.copy()
