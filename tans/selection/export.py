"""The exported winner of a search: a standalone subnet anyone can load and run.

An export is a directory of files, each written atomically (temp file + rename, one upload on
S3), ``model.json`` last (so a reader that finds ``model.json`` finds complete weights):

* ``model.pt``: the subnet's state dict (CPU tensors), loaded with ``weights_only=True``. An
  export written over an existing one names its weights ``model-<id>.pt`` and the new
  ``model.json`` (its ``weights`` key) swaps them in; the old weights go after that;
* ``model.safetensors``: the same state dict in the ``safetensors`` format (contiguous copies, so
  NCHW strides; equal tensor for tensor), for tools outside PyTorch's pickle world. Its header
  metadata holds ``tans.export_id``;
* ``config.json``: the Hugging-Face-style description (``id2label``, ``label2id``,
  ``num_labels``, ``image_size``, ``num_channels``, the preprocessing...). It and ``model.json``
  are built from one dict (:func:`export_metadata`), so they cannot disagree;
* ``README.md``: the model card (what it is, its budget, its size, the search's tables when the
  exporter passes them, how to load it with tans and with plain safetensors);
* ``model.json``: what is needed to rebuild and feed it: the family and arch (the structure is
  rebuilt from them, see :func:`tans.selection.finetune.build_structure`), the class names, the input
  size and channels, and the preprocessing (resize, channels, scaling to [-1, 1] exactly as
  :func:`tans.data.reader.to_float`), plus its size and whatever the exporter adds under ``extra``.

Every file carries the export's ``export_id`` (``model.json``, ``config.json``, the safetensors
header, the card, and the ONNX metadata of :mod:`tans.selection.onnx_export`): files with the
same id belong to the same export. ``model.safetensors``, ``config.json`` and ``README.md`` keep
those fixed names (what other ecosystems look for), so an export written over another overwrites
them before its ``model.json`` lands: a kill in between leaves ``model.json`` (and
:func:`load_model`, which only reads the weights ``model.json`` names) whole on the old export,
with some of those three files already new; their ``export_id`` says which. A ``model.onnx``
beside the old export is deleted before anything new is written (it was converted from the old
weights); the old ``.pt`` after the switch.

:func:`load_model` reads one back from a local directory, an ``s3://`` directory, or a path
relative to the default storage root, and returns a :class:`LoadedModel` that preprocesses raw
images (uint8 tensors, numpy arrays or PIL images of any size) and predicts. It reads the
``.pt`` weights that ``model.json`` names (never ``model.safetensors``: the ``.pt`` is what the
swap protects, and exports written before ``model.safetensors`` existed have only it).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn

from tans.data.reader import MEAN, STD, to_float
from tans.selection.finetune import build_structure, model_size
from tans.storage import Storage, default_root, resolve_filesystem
from tans.zoo.subnets import Arch
from tans.zoo.supernets import get_family, unwrap

FORMAT = "tans-model/1"
MODEL_JSON = "model.json"
MODEL_PT = "model.pt"
SAFETENSORS = "model.safetensors"
CONFIG_JSON = "config.json"
CARD = "README.md"
MODEL_ONNX = "model.onnx"


class ModelLoadError(ValueError):
    """An exported model that cannot be found, read or rebuilt (one-line message)."""


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def preprocessing_spec(image_size: int, channels: int) -> dict:
    """The preprocessing an exported model expects, as recorded in ``model.json``."""
    return {
        "input": "uint8 images (N x C x H x W tensors, or H x W (x C) arrays / PIL images of any size)",
        "channels": channels,
        "channel_conversion": ("grey repeated to 3 channels, alpha dropped" if channels == 3
                               else "converted to grey (PIL 'L'; arrays: rounded channel mean)"),
        "resize": {"size": [image_size, image_size], "mode": "bilinear", "antialias": True,
                   "align_corners": False, "when": "size differs", "then": "rounded and clamped to uint8"},
        "scale": f"(x / 255 - {MEAN}) / {STD}",
        "mean": MEAN,
        "std": STD,
        "range": [-1.0, 1.0],
    }


def export_metadata(
    family_name: str,
    arch: Arch,
    classes: Sequence[str],
    image_size: int,
    channels: int,
    n_params: int,
    flops: int,
    extra: dict | None = None,
) -> dict:
    """The one description of an export that ``model.json``, ``config.json`` and the card are built from."""
    return {
        "format": FORMAT,
        "family": family_name,
        "arch": arch.to_dict(),
        "classes": [str(c) for c in classes],
        "num_classes": len(classes),
        "image_size": int(image_size),
        "channels": int(channels),
        "preprocessing": preprocessing_spec(int(image_size), int(channels)),
        "n_params": int(n_params),
        "flops": int(flops),
        "torch_version": torch.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


def hf_config(meta: dict) -> dict:
    """``config.json``: the Hugging-Face-style view of ``model.json``'s ``meta`` (same values, HF key names)."""
    classes = list(meta["classes"])
    return {
        "library_name": "tans",
        "model_type": "ofa_mobilenet_v3",
        "architectures": ["OFAMobileNetV3"],
        "tans_format": meta["format"],
        "family": meta["family"],
        "arch": meta["arch"],
        "num_labels": len(classes),
        "num_classes": len(classes),
        "class_names": classes,
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        "image_size": meta["image_size"],
        "num_channels": meta["channels"],
        "input_shape": [meta["channels"], meta["image_size"], meta["image_size"]],
        "preprocessing": meta["preprocessing"],
        "n_params": meta["n_params"],
        "flops": meta["flops"],
        "weights": SAFETENSORS,
        "export_id": meta.get("export_id"),
        "torch_version": meta["torch_version"],
        "created_at": meta["created_at"],
    }


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rows of dicts as a markdown table (columns: the keys, in order of first appearance)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if not columns:
        return []
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def model_card(meta: dict, tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> str:
    """``README.md``: a model card for the export described by ``meta`` (``model.json``'s dict).

    The budget comes from ``meta["extra"]["constraints"]`` (``max_params``, ``max_flops``,
    ``family``) when the exporter recorded one; ``tables`` (title -> rows) are shown as they are.
    """
    extra = meta.get("extra") or {}
    classes = meta["classes"]
    size, ch = meta["image_size"], meta["channels"]
    shown = ", ".join(f"`{c}`" for c in classes[:50])
    if len(classes) > 50:
        shown += f", ... ({len(classes) - 50} more)"
    lines = [
        "---",
        "library_name: tans",
        "pipeline_tag: image-classification",
        "tags: [image-classification, ofa, mobilenetv3, tans]",
        "---",
        "",
        f"# {meta['family']} subnet: {len(classes)}-class image classifier",
        "",
        f"An OFA MobileNetV3 subnet (family `{meta['family']}`) picked from a zoo of pretrained networks by a "
        "TANS search (task-adaptive neural network search, TANS on Ray) and fine-tuned on the task. "
        f"Export `{meta.get('export_id')}`, written {meta['created_at']} with torch {meta['torch_version']}.",
        "",
        f"- **Classes ({len(classes)})**: {shown}",
        f"- **Input**: {ch}-channel {size} x {size} images "
        f"(`{ch} x {size} x {size}` float tensors after preprocessing)",
        f"- **Size**: {meta['n_params']:,} parameters (without the classifier head), "
        f"{meta['flops'] / 1e6:,.1f} MFLOPs per {size} x {size} image",
        f"- **Architecture**: kernel sizes `{meta['arch'].get('ks')}`, expand ratios `{meta['arch'].get('e')}`, "
        f"depths `{meta['arch'].get('d')}`",
    ]
    lines += _card_search_lines(meta, extra)
    for title, rows in (tables or {}).items():
        if rows:
            lines += ["", f"## {title}", "", *markdown_table(rows)]
    return "\n".join(lines + _card_usage_lines(meta)) + "\n"


def _card_search_lines(meta: dict, extra: dict) -> list[str]:
    """The card's constraints, accuracy and lineage bullets (what the exporter recorded in ``extra``)."""
    lines = []
    budget = {k: v for k, v in (extra.get("constraints") or {}).items() if v}
    if budget:
        parts = []
        limits = (("max_params", meta["n_params"], "parameters"), ("max_flops", meta["flops"], "FLOPs"))
        for key, value, label in limits:
            if budget.get(key):
                ok = "met" if value <= budget[key] else "NOT met"
                parts.append(f"{label} ≤ {budget[key]:,} ({ok}: {value:,})")
        if budget.get("family"):
            parts.append(f"family `{budget['family']}`")
        lines.append(f"- **Constraints of the search**: {'; '.join(parts)}")
    else:
        lines.append("- **Constraints of the search**: none recorded")
    metrics = [(k, extra[k]) for k in ("val_accuracy", "test_accuracy") if isinstance(extra.get(k), (int, float))]
    if metrics:
        lines.append("- **Accuracy**: " + ", ".join(f"{k.split('_')[0]} {100 * v:.1f} %" for k, v in metrics))
    lineage = [(k, extra[k]) for k in ("model_id", "zoo_task", "space", "lr", "epochs", "seed") if k in extra]
    if lineage:
        lines.append("- **Lineage**: " + ", ".join(f"{k} `{v}`" for k, v in lineage))
    return lines


def _card_usage_lines(meta: dict) -> list[str]:
    """The card's preprocessing, how-to-load and files sections."""
    size = meta["image_size"]
    pre = meta["preprocessing"]
    return [
        "",
        "## Preprocessing",
        "",
        f"uint8 images -> {pre['channel_conversion']} -> resized to {size} x {size} (bilinear, antialiased, "
        f"only when the size differs; rounded back to uint8) -> `{pre['scale']}`, i.e. values in [-1, 1]. "
        "`LoadedModel.preprocess` does exactly this; `model.json` and `config.json` record it under `preprocessing`.",
        "",
        "## How to load",
        "",
        "With tans (rebuilds the network from `model.json`, reads the weights with `weights_only=True`, "
        "takes raw images of any size):",
        "",
        "```python",
        "from tans.selection.export import load_model",
        "",
        'm = load_model("path/to/this/directory")          # or s3://..., or searches/<run>/model',
        "m.predict_classes(images)                        # uint8 N x C x H x W tensors, numpy arrays or PIL images",
        "logits = m.model(m.preprocess(images))           # the nn.Module itself, in eval mode",
        "```",
        "",
        "With plain safetensors (the state dict of a standalone OFA `MobileNetV3`; rebuild the structure from "
        "`config.json`'s `family` and `arch`, e.g. with `tans.selection.finetune.build_structure`):",
        "",
        "```python",
        "import json",
        "from safetensors.torch import load_file",
        "",
        'state = load_file("model.safetensors")            # {name: tensor}',
        'config = json.load(open("config.json"))           # id2label, image_size, preprocessing, arch',
        "from tans.selection.finetune import build_structure",
        "from tans.zoo.subnets import Arch",
        'net = build_structure(config["family"], Arch.from_dict(config["arch"]), config["num_labels"])',
        "net.load_state_dict(state)",
        "```",
        "",
        "As ONNX: `tans export --model path/to/this/directory --onnx` writes `model.onnx` (input: the preprocessed "
        "float batch, dynamic batch axis; output: logits; the preprocessing is in its metadata).",
        "",
        "## Files",
        "",
        f"`{meta.get('weights', MODEL_PT)}` (PyTorch state dict), `{SAFETENSORS}` (the same tensors), "
        f"`{CONFIG_JSON}`, `{MODEL_JSON}` (tans's description, written last) and this `{CARD}`. `{MODEL_JSON}`, "
        f"`{CONFIG_JSON}`, the safetensors header (`tans.export_id`) and this card name export "
        f"`{meta.get('export_id')}`: files that name another export are left over from an interrupted re-export.",
    ]


def export_model(
    storage_or_dir: Storage | str,
    rel_dir: str,
    model: nn.Module,
    family_name: str,
    arch: Arch,
    classes: Sequence[str],
    image_size: int,
    channels: int = 3,
    extra: dict | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """Write an export (see the module's docstring) under ``rel_dir`` of a storage root; returns the dir's URI.

    ``storage_or_dir`` is a :class:`~tans.storage.Storage` or a root (local path or ``s3://``).
    ``model`` is a standalone subnet of ``arch`` (from :func:`tans.selection.finetune.build_candidate`)
    whose head has ``len(classes)`` outputs. ``extra`` (JSON-serialisable: metrics, lineage, the
    search's ``constraints``) is stored as is. ``tables`` (title -> rows of dicts, e.g. the search's
    candidates) go into the model card only. Files go in this order: the ``.pt`` weights,
    ``model.safetensors``, ``config.json``, ``README.md``, ``model.json`` (last). An earlier export in
    the same place is replaced: its ``model.onnx`` goes first, its ``.pt`` after the new ``model.json``.
    """
    from safetensors.torch import save as safetensors_bytes

    storage = storage_or_dir if isinstance(storage_or_dir, Storage) else Storage(str(storage_or_dir))
    family = get_family(family_name)
    arch.check(family)
    classes = [str(c) for c in classes]
    net: Any = unwrap(model)  # an OFA network: its submodules are dynamic attributes
    out_features = net.classifier.linear.out_features
    if out_features != len(classes):
        raise ValueError(f"the model has {out_features} outputs but {len(classes)} class names were given")
    in_channels = net.first_conv.conv.in_channels
    if channels != in_channels:
        raise ValueError(f"channels={channels} but the model takes {in_channels}-channel images")
    n_params, flops = model_size(net, image_size)
    meta = export_metadata(family_name, arch, classes, image_size, channels, n_params, flops, extra)
    json.dumps(meta)  # fails early if extra is not JSON
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    rel_dir = rel_dir.strip("/")
    join = (lambda name: f"{rel_dir}/{name}") if rel_dir else (lambda name: name)
    # Replacing an export builds beside it, then swaps: the new weights get a name of their own,
    # and the new model.json (one atomic write) names them. Until then the old export loads whole.
    replacing = storage.is_file(join(MODEL_JSON))
    export_id = uuid.uuid4().hex[:8]
    weights = f"model-{export_id}.pt" if replacing else MODEL_PT
    meta.update(weights=weights, safetensors=SAFETENSORS, export_id=export_id)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    tensors = {k: v.contiguous() for k, v in state.items()}  # safetensors stores dense row-major tensors
    st_bytes = safetensors_bytes(tensors, metadata={"format": "pt", "tans.format": FORMAT,
                                                    "tans.export_id": export_id, "tans.family": family_name})
    if replacing:
        storage.delete(join(MODEL_ONNX))  # converted from the old weights: never beside the new ones
    storage.write_bytes(join(weights), buf.getvalue())
    storage.write_bytes(join(SAFETENSORS), st_bytes)
    storage.write_bytes(join(CONFIG_JSON), (json.dumps(hf_config(meta), indent=2) + "\n").encode())
    storage.write_bytes(join(CARD), model_card(meta, tables).encode())
    storage.write_text(join(MODEL_JSON), text)
    if replacing:
        for entry in storage.list(rel_dir):
            name = entry.rsplit("/", 1)[-1]
            if name.startswith("model") and name.endswith(".pt") and name != weights:
                storage.delete(entry)
    return storage.uri_of(rel_dir)


# -- loading -----------------------------------------------------------------------------------


def _to_uint8_nchw(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """Channel conversion and resizing of a uint8 ``N x C x H x W`` batch, as :func:`tans.data.reader.decode_images`."""
    if images.shape[1] == 4:
        images = images[:, :3]
    elif images.shape[1] == 2:  # grey + alpha
        images = images[:, :1]
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        images = images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if images.shape[1] != channels:
        raise ValueError(f"cannot make {channels}-channel images from {images.shape[1]} channels")
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        resized = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                                antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def _one_image(img, channels: int) -> torch.Tensor:
    """A PIL image or an ``H x W (x C)`` uint8 array as a uint8 ``1 x C x H x W`` tensor."""
    if hasattr(img, "mode") and hasattr(img, "convert"):  # a PIL image
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGB" if channels == 3 else "L")
        elif channels == 1 and img.mode != "L":
            img = img.convert("L")
        arr = np.asarray(img)
    elif isinstance(img, np.ndarray):
        arr = img
    elif isinstance(img, torch.Tensor):
        return _tensor_batch(img)
    else:
        raise TypeError(f"cannot preprocess a {type(img).__name__}: pass uint8 tensors, numpy arrays or PIL images")
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0-255), got an array of {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"an image array must be H x W or H x W x C (C in 1-4), got shape {arr.shape}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None]  # a copy: PIL arrays are read-only


def _tensor_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise TypeError(f"image tensors must be uint8 (0-255), got {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"an image tensor must be N x C x H x W or C x H x W (C in 1-4), "
                         f"got shape {tuple(images.shape)}")
    return images


def preprocess_images(images, image_size: int, channels: int = 3) -> torch.Tensor:
    """Raw images to the network's float input ``N x channels x image_size x image_size`` in [-1, 1].

    ``images``: a uint8 tensor ``N x C x H x W`` (or ``C x H x W``), or one or a list of PIL
    images / uint8 numpy arrays ``H x W (x C)`` of any sizes. Identical to what training saw:
    :func:`tans.data.reader.decode_images` (channels, bilinear antialiased resize, rounded to uint8)
    then :func:`tans.data.reader.to_float`.
    """
    if isinstance(images, torch.Tensor):
        batch = _to_uint8_nchw(_tensor_batch(images), image_size, channels)
        return to_float(batch)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # N x H x W x C
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        return torch.zeros((0, channels, image_size, image_size), dtype=torch.float32)
    parts = [_to_uint8_nchw(_one_image(img, channels), image_size, channels) for img in images]
    return to_float(torch.cat(parts))


@dataclass
class LoadedModel:
    """An exported model ready to predict: ``model`` is in eval mode."""

    model: nn.Module
    family: str
    arch: Arch
    classes: list[str]
    image_size: int
    channels: int
    uri: str
    metadata: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, images) -> torch.Tensor:
        """See :func:`preprocess_images` (this model's size and channels)."""
        return preprocess_images(images, self.image_size, self.channels)

    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        """Class scores ``N x num_classes`` (CPU, float32) for raw images."""
        x = self.preprocess(images)
        device = next(self.model.parameters()).device
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                out.append(self.model(x[start : start + batch_size].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.num_classes))

    def predict(self, images, batch_size: int = 256) -> torch.Tensor:
        """Predicted class indices (int64 ``N``) for raw images."""
        return self.logits(images, batch_size).argmax(dim=1)

    def predict_classes(self, images, batch_size: int = 256) -> list[str]:
        """Predicted class names for raw images."""
        return [self.classes[i] for i in self.predict(images, batch_size).tolist()]


def _locate(uri: str) -> str:
    """A local path or URI for ``uri``: kept if it is a URI, absolute or an existing local dir;
    otherwise taken relative to the default storage root."""
    uri = str(uri)
    if "://" in uri or uri.startswith(("/", "~", ".")) or os.path.isdir(uri):
        return uri
    return f"{default_root().rstrip('/')}/{uri.strip('/')}"


def _read(fs: pafs.FileSystem, path: str, where: str, what: str) -> bytes:
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ModelLoadError(f"{where}: {what} is missing (not an exported model, or its export did not finish)")
        with fs.open_input_stream(path) as f:
            return f.read()
    except ModelLoadError:
        raise
    except Exception as err:  # S3 down, permissions: one message
        raise ModelLoadError(f"{where}: cannot read {what} ({_one_line(err)})") from None


def _metadata(raw: bytes, where: str) -> dict:
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{where}/{MODEL_JSON}: not valid JSON ({_one_line(err, 80)})") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{where}/{MODEL_JSON}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("family", str), ("arch", dict), ("classes", list), ("image_size", int), ("channels", int)):
        if key not in meta:
            raise ModelLoadError(f"{where}/{MODEL_JSON}: missing key {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ModelLoadError(f"{where}/{MODEL_JSON}: {key!r} must be a {kind.__name__}, "
                                 f"got {type(meta[key]).__name__}")
    if not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]):
        raise ModelLoadError(f"{where}/{MODEL_JSON}: 'classes' must be a non-empty list of names")
    if meta.get("num_classes", len(meta["classes"])) != len(meta["classes"]):
        raise ModelLoadError(f"{where}/{MODEL_JSON}: num_classes={meta['num_classes']} "
                             f"but {len(meta['classes'])} classes are listed")
    if meta["image_size"] < 1 or meta["channels"] not in (1, 3):
        raise ModelLoadError(f"{where}/{MODEL_JSON}: bad image_size={meta['image_size']} "
                             f"or channels={meta['channels']}")
    return meta


def _check_state(model: nn.Module, state: dict, where: str, family: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape "
                         f"(e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise ModelLoadError(f"{where}/{MODEL_PT} does not match the {family} arch in {MODEL_JSON}: {', '.join(parts)}")


def load_model(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an export written by :func:`export_model`.

    ``uri``: a local directory, an ``s3://`` directory, or a path relative to the default
    storage root (``$TANS_ROOT``, e.g. ``searches/<run>/model``); one of the directory's files
    (``model.json``, ``model.pt``, ``model.safetensors``, ``config.json``, ``README.md``) is accepted
    too. The weights are the ``.pt`` file ``model.json`` names (``model.safetensors`` holds the same
    tensors, for other tools), read with ``weights_only=True``. Raises
    :class:`ModelLoadError` (one line) for a missing directory, a missing or corrupt file, or
    weights that do not fit the recorded family and arch.
    """
    where = _locate(uri)
    try:
        fs, base = resolve_filesystem(where)
        info = fs.get_file_info(base)
    except Exception as err:  # bad scheme, no bucket, S3 unreachable
        raise ModelLoadError(f"{where}: cannot open ({_one_line(err)})") from None
    if info.type == pafs.FileType.File and posixpath.basename(base) in (MODEL_JSON, MODEL_PT, SAFETENSORS,
                                                                                 CONFIG_JSON, CARD):
        base, where = posixpath.dirname(base), where.rstrip("/").rsplit("/", 1)[0]
    elif info.type == pafs.FileType.NotFound:
        raise ModelLoadError(f"{where}: no such directory "
                             f"(expected an exported model with {MODEL_JSON} and {MODEL_PT})")
    elif info.type != pafs.FileType.Directory:
        raise ModelLoadError(f"{where}: not a directory (expected an exported model with {MODEL_JSON} and {MODEL_PT})")
    where = where.rstrip("/")
    meta = _metadata(_read(fs, posixpath.join(base, MODEL_JSON), where, MODEL_JSON), where)
    try:
        arch = Arch.from_dict(meta["arch"])
        model = build_structure(meta["family"], arch, len(meta["classes"]))
    except (KeyError, TypeError, ValueError) as err:  # SupernetError is a ValueError
        raise ModelLoadError(f"{where}/{MODEL_JSON}: cannot rebuild the network ({_one_line(err)})") from None
    weights = meta.get("weights", MODEL_PT)
    if not isinstance(weights, str) or "/" in weights or not weights.endswith(".pt"):
        raise ModelLoadError(f"{where}/{MODEL_JSON}: 'weights' must name a .pt file beside it, got {weights!r}")
    raw = _read(fs, posixpath.join(base, weights), where, weights)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles code
        raise ModelLoadError(f"{where}/{MODEL_PT}: not a readable weights-only PyTorch checkpoint "
                             f"({_one_line(err, 100)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{where}/{MODEL_PT}: expected a state dict of tensors, got {type(state).__name__}")
    _check_state(model, state, where, meta["family"])
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedModel(model=model, family=meta["family"], arch=arch, classes=list(meta["classes"]),
                       image_size=meta["image_size"], channels=meta["channels"], uri=where, metadata=meta)
