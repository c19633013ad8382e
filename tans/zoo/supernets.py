"""Supernet families: a small timm-style registry of Once-for-All MobileNetV3 supernets.

A *family* fixes everything about a supernet except its weights and its number of classes: the
width multiplier, the kernel-size / expand-ratio / depth choices, the default image size and the
penultimate width (the length of a zoo row's functional embedding, so a retrieval space is
trained per family). ``get_family(name).build(num_classes)`` makes a randomly initialised
supernet; :func:`load_initial_weights` fills it from ``ofa:<net_id>`` (the released OFA weights)
or from a checkpoint URI (local path or ``s3://``).

Architectures are always written as 5 stages x 4 block slots (``ks[20]``, ``e[20]``, ``d[5]``),
whatever the family's largest depth; see :mod:`tans.zoo.subnets`.
"""

from __future__ import annotations

import io
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
from ofa.utils.layers import LinearLayer

from tans.storage import resolve_filesystem
from tans.zoo.small_maps import fast_layout

N_STAGES = 5  # elastic stages of OFA-MobileNetV3 (the first block is fixed)
SLOTS_PER_STAGE = 4  # block slots per stage in an architecture vector (OFA's largest depth)

# Where ofa.model_zoo.ofa_net fetches its weights (same URL; see _download_ofa for why we fetch).
OFA_URL_BASE = "https://raw.githubusercontent.com/han-cai/files/master/ofa/ofa_nets/"
DOWNLOAD_TIMEOUT_S = 30.0


class SupernetError(ValueError):
    """An unknown family or an unusable checkpoint (one-line message saying what to do)."""


@dataclass(frozen=True)
class SupernetFamily:
    """One supernet design; ``build`` makes a fresh OFA-MobileNetV3 for ``num_classes``."""

    name: str
    description: str
    width_mult: float
    ks_choices: tuple[int, ...]
    e_choices: tuple[int, ...]
    d_choices: tuple[int, ...]
    default_image_size: int
    penultimate_dim: int  # input width of the classifier = length of f_emb
    ofa_net_id: str = ""  # the released OFA weights that fit this family ("" if none)

    @property
    def max_depth(self) -> int:
        return max(self.d_choices)

    def build(self, num_classes: int, dropout: float = 0.0) -> OFAMobileNetV3:
        """A randomly initialised supernet with a ``num_classes`` head, set to its largest subnet."""
        if num_classes < 1:
            raise SupernetError(f"num_classes must be >= 1, got {num_classes}")
        model = OFAMobileNetV3(
            n_classes=num_classes,
            bn_param=(0.1, 1e-5),
            dropout_rate=dropout,
            width_mult=self.width_mult,
            ks_list=list(self.ks_choices),
            expand_ratio_list=list(self.e_choices),
            depth_list=list(self.d_choices),
        )
        model.set_max_net()
        return fast_layout(model)


_FAMILIES: dict[str, SupernetFamily] = {}


def register_family(family: SupernetFamily) -> SupernetFamily:
    """Add ``family`` to the registry (names are unique)."""
    if family.name in _FAMILIES:
        raise SupernetError(f"supernet family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


register_family(SupernetFamily(
    name="ofa_mbv3_w1.0",
    description="OFA MobileNetV3, width 1.0 (the OFA paper's supernet; 'ofa:ofa_mbv3_d234_e346_k357_w1.0' weights)",
    width_mult=1.0, ks_choices=(3, 5, 7), e_choices=(3, 4, 6), d_choices=(2, 3, 4),
    default_image_size=48, penultimate_dim=1280, ofa_net_id="ofa_mbv3_d234_e346_k357_w1.0",
))
register_family(SupernetFamily(
    name="ofa_mbv3_w1.2",
    description="OFA MobileNetV3, width 1.2 ('ofa:ofa_mbv3_d234_e346_k357_w1.2' weights)",
    width_mult=1.2, ks_choices=(3, 5, 7), e_choices=(3, 4, 6), d_choices=(2, 3, 4),
    default_image_size=48, penultimate_dim=1536, ofa_net_id="ofa_mbv3_d234_e346_k357_w1.2",
))
register_family(SupernetFamily(
    name="ofa_mbv3_tiny",
    description="OFA MobileNetV3, width 0.35, fewer choices: for tests and laptops (no released weights)",
    width_mult=0.35, ks_choices=(3, 5), e_choices=(3, 4), d_choices=(2, 3),
    default_image_size=32, penultimate_dim=448,
))


def list_families() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_FAMILIES)


def get_family(name: str) -> SupernetFamily:
    """The family called ``name``; :class:`SupernetError` naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise SupernetError(f"unknown supernet family {name!r} (known: {', '.join(list_families())})") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The supernet inside a DDP (or similar) wrapper; the model itself otherwise."""
    return getattr(model, "module", model)


def forward_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features (the classifier's input, ``N x penultimate_dim``) of the active subnet.

    Mirrors ``OFAMobileNetV3.forward`` without the classifier, so the head is never run or changed.
    """
    net: Any = unwrap(model)  # an OFAMobileNetV3: its submodules are untyped module attributes
    x = net.first_conv(x)
    x = net.blocks[0](x)
    for stage, block_idx in enumerate(net.block_group_info):
        for idx in block_idx[: net.runtime_depth[stage]]:
            x = net.blocks[idx](x)
    x = net.final_expand_layer(x)
    x = x.mean(3, keepdim=True).mean(2, keepdim=True)  # global average pooling, as OFA does
    x = net.feature_mix_layer(x)
    return x.flatten(1)


def new_head(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """Replace the classifier with a fresh ``num_classes`` one (same dropout); returns the model."""
    net: Any = unwrap(model)  # an OFAMobileNetV3 (untyped)
    old = net.classifier
    head = LinearLayer(old.in_features, num_classes, dropout_rate=old.dropout_rate)
    device = next(old.parameters()).device
    net.classifier = head.to(device)
    return model


# -- initial weights ---------------------------------------------------------------------------


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ofa_cache_dir() -> Path:
    return Path(os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch"))) / "ofa_nets"


def _download_ofa(net_id: str) -> bytes:
    """The bytes of OFA's released checkpoint ``net_id`` (cached under ``$TORCH_HOME/ofa_nets``).

    Same URL as ``ofa.model_zoo.ofa_net``, but fetched here because OFA's ``download_url`` has no
    timeout (a closed network can hang it), writes straight to the final name (a killed download
    leaves a truncated file that is then trusted forever) and caches under ``./.torch`` of
    whatever directory the job runs in.
    """
    target = _ofa_cache_dir() / net_id
    if target.is_file():
        return target.read_bytes()
    with urllib.request.urlopen(OFA_URL_BASE + net_id, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        data = resp.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{net_id}")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: readers see the whole file or none
    return data


def _read_checkpoint_bytes(uri: str) -> bytes:
    if uri.startswith("ofa:"):
        net_id = uri[len("ofa:"):]
        known = sorted(f.ofa_net_id for f in _FAMILIES.values() if f.ofa_net_id)
        if net_id not in known:
            raise SupernetError(f"unknown OFA net id {net_id!r} (these fit a family: {', '.join(known)})")
        try:
            return _download_ofa(net_id)
        except Exception as err:  # any network failure ends in the same advice
            raise SupernetError(
                f"could not download ofa:{net_id} ({_one_line(err)}); "
                "download the checkpoint elsewhere and pass its path or s3:// URI instead"
            ) from None
    try:
        fs, path = resolve_filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as err:  # missing file, bad scheme, S3 down: one message
        raise SupernetError(f"could not read checkpoint {uri} ({_one_line(err)})") from None


def _state_dict_from(obj, uri: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SupernetError(f"{uri}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise SupernetError(f"{uri}: the checkpoint holds no tensors")
    return state


def _model_key(key: str, model_keys: set[str]) -> str:
    """Map a checkpoint key to this model's naming (DDP prefixes, OFA's older layer names)."""
    if key.startswith("module."):
        key = key[len("module."):]
    key = key.replace(".mobile_inverted_conv.", ".conv.")
    if key in model_keys:
        return key
    # The renames OFAMobileNetV3.load_state_dict applies to its released checkpoints.
    for old, new in ((".bn.bn.", ".bn."), (".conv.conv.weight", ".conv.weight"),
                     (".linear.linear.", ".linear."), (".linear.", ".linear.linear."),
                     ("bn.", "bn.bn."), ("conv.weight", "conv.conv.weight")):
        if old in key and key.replace(old, new) in model_keys:
            return key.replace(old, new)
    return key


def load_initial_weights(model: torch.nn.Module, uri: str) -> dict:
    """Copy weights from ``uri`` (``ofa:<net_id>``, a local path or ``s3://``) into ``model``.

    Reads the bytes (``ofa:`` from OFA's release, anything else through
    :func:`tans.storage.resolve_filesystem`), loads them with ``weights_only=True`` and hands the
    state dict to :func:`load_state`. Raises :class:`SupernetError` (one line) when the file
    cannot be fetched or read, or is not a weights-only checkpoint.
    """
    data = _read_checkpoint_bytes(uri)
    try:
        # weights_only: loading someone else's checkpoint must never run their code.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickles code
        raise SupernetError(f"{uri}: not a readable weights-only PyTorch checkpoint ({_one_line(err, 120)})") from None
    return load_state(model, obj, source=uri)


def load_state(model: torch.nn.Module, obj: dict, source: str = "state dict") -> dict:
    """Copy a state dict (raw or ``{"state_dict": ...}``) into ``model`` where names and shapes match.

    Names are normalised (``module.`` prefixes, OFA's older layer names); a classifier of another
    size is skipped, so the model keeps its own head for a new number of classes. Returns
    ``{"loaded": n, "skipped": [checkpoint names], "missing": [model names not loaded]}``.
    Raises :class:`SupernetError` if nothing matches or a body tensor has another shape (the
    checkpoint belongs to another family).
    """
    state = _state_dict_from(obj, source)
    net = unwrap(model)
    target = net.state_dict()
    keys = set(target)
    loaded: list[str] = []
    skipped: list[str] = []
    wrong: list[str] = []
    with torch.no_grad():
        for key, tensor in state.items():
            name = _model_key(key, keys)
            if name not in keys:
                skipped.append(key)
            elif target[name].shape != tensor.shape:
                (skipped if name.startswith("classifier.") else wrong).append(name)
            else:
                target[name].copy_(tensor)  # state_dict() tensors share storage with the model
                loaded.append(name)
    if wrong:
        first = wrong[0]
        raise SupernetError(
            f"{source}: {len(wrong)} tensors have another shape than this supernet's (e.g. {first}: "
            f"{tuple(_checkpoint_shape(state, first, keys))} vs {tuple(target[first].shape)}); "
            "is it for another family?"
        )
    if not loaded:
        raise SupernetError(f"{source}: no tensor matches this supernet (is it an OFA-MobileNetV3 checkpoint?)")
    return {"loaded": len(loaded), "skipped": skipped, "missing": sorted(keys - set(loaded))}


def _checkpoint_shape(state: dict[str, torch.Tensor], model_name: str, keys: set[str]) -> torch.Size:
    """Shape of the checkpoint tensor that maps to ``model_name`` (for error messages)."""
    for key, tensor in state.items():
        if _model_key(key, keys) == model_name:
            return tensor.shape
    return torch.Size()
