"""An exported model as ONNX: ``model.onnx`` for onnxruntime and every other ONNX consumer.

The graph takes the *preprocessed* batch (float32 ``N x C x H x W``, ``H = W`` the export's
image size, values in [-1, 1]; ``N`` is a dynamic axis) as ``pixel_values`` and returns the
logits (float32 ``N x num_classes``) as ``logits``. The preprocessing itself (channel
conversion, resize, scaling) is not in the graph: it is recorded in the model's
``metadata_props`` (``tans.preprocessing``, the same JSON as ``model.json``'s), with the class
names, family, arch, input size and the export's ``export_id``.

Needs the ``onnx`` package (``pip install 'tans[export]'``); :func:`check_onnx` also needs
``onnxruntime``. ``tans export --model URI --onnx`` (``jobs/export.py``) is the command.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import warnings

import numpy as np
import torch

from tans.selection.export import FORMAT, MODEL_ONNX, LoadedModel, load_model
from tans.storage import Storage, StorageError
from tans.zoo.small_maps import plain_copy

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17  # HardSwish needs 14; 17 runs on onnxruntime >= 1.13
INSTALL_HINT = "pip install 'tans[export]'"


class ExportError(ValueError):
    """A conversion that cannot be done as asked (missing package, bad output path): one line."""


def _require(package: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ExportError(f"the {package!r} package is not installed: {INSTALL_HINT}") from None


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file (string values; JSON where structured)."""
    meta = loaded.metadata
    size, ch = loaded.image_size, loaded.channels
    return {
        "tans.format": FORMAT,
        "tans.family": loaded.family,
        "tans.arch": json.dumps(loaded.arch.to_dict(), sort_keys=True),
        "tans.classes": json.dumps(loaded.classes),
        "tans.image_size": str(size),
        "tans.channels": str(ch),
        "tans.input": f"{INPUT_NAME}: float32 N x {ch} x {size} x {size}, already preprocessed (tans.preprocessing)",
        "tans.output": f"{OUTPUT_NAME}: float32 N x {loaded.num_classes}, class scores (softmax for probabilities)",
        "tans.preprocessing": json.dumps(meta.get("preprocessing"), sort_keys=True),
        "tans.export_id": str(meta.get("export_id") or ""),
    }


def to_onnx(loaded: LoadedModel, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialized ONNX model of ``loaded`` (see the module's docstring)."""
    _require("onnx")
    import onnx

    # The TorchScript-based exporter (dynamo=False), deliberately: it needs only the `onnx`
    # package (the torch.export-based default needs onnxscript as well), and on these subnets it
    # is exact (onnxruntime matches PyTorch to float rounding; tests/tans/selection/test_export_cli.py).
    # It traces one forward at the fixed H x W: the only shape-dependent Python in an OFA subnet
    # is the kernel cropping of tans.zoo.small_maps, and plain_copy swaps that back for OFA's
    # plain convolutions (same values) so the graph holds ordinary Conv nodes. The batch axis is
    # declared dynamic; nothing in the forward depends on it.
    net = plain_copy(loaded.model).cpu().float().eval()
    dummy = torch.zeros(2, loaded.channels, loaded.image_size, loaded.image_size)
    batch_axis = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with tempfile.TemporaryDirectory(prefix="tans-onnx-") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        path = os.path.join(tmp, MODEL_ONNX)
        torch.onnx.export(net, (dummy,), path, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=batch_axis, do_constant_folding=True)
        model = onnx.load(path)
    for key, value in onnx_metadata(loaded).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.doc_string = (f"TANS export {loaded.metadata.get('export_id') or ''}: {loaded.family} subnet, "
                        f"{loaded.num_classes} classes; input {INPUT_NAME} is the preprocessed batch "
                        "(see metadata tans.preprocessing), output is logits")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_onnx(data: bytes, loaded: LoadedModel, inputs: torch.Tensor | None = None) -> float:
    """Max abs difference between onnxruntime's and PyTorch's (eval) logits on ``inputs``.

    ``inputs``: a preprocessed float batch; by default 3 seeded random inputs in [-1, 1].
    """
    _require("onnxruntime")
    import onnxruntime as ort  # type: ignore[import-untyped]

    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        inputs = torch.rand(3, loaded.channels, loaded.image_size, loaded.image_size, generator=gen) * 2 - 1
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy().astype(np.float32)})[0]
    loaded.model.eval()
    with torch.no_grad():
        expected = loaded.model(inputs.to(next(loaded.model.parameters()).device)).float().cpu().numpy()
    return float(np.abs(got - expected).max()) if got.size else 0.0


def default_out(loaded: LoadedModel) -> str:
    """``model.onnx`` in the export's directory when that is local, else in the working directory."""
    if "://" not in loaded.uri and os.path.isdir(loaded.uri):
        return os.path.join(loaded.uri, MODEL_ONNX)
    return os.path.abspath(MODEL_ONNX)


def write_bytes(out: str, data: bytes) -> str:
    """Write ``data`` to ``out`` (local path or ``s3://``) atomically; returns where it went.

    An existing local directory gets ``model.onnx`` inside it; a local parent must exist.
    """
    out = str(out)
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
        if os.path.isdir(out):
            out = os.path.join(out, MODEL_ONNX)
        parent = os.path.dirname(out)
        if not os.path.isdir(parent):
            raise ExportError(f"--out {out}: no such directory {parent}")
    elif out.endswith("/"):
        out += MODEL_ONNX
    parent, name = posixpath.split(out.rstrip("/"))
    if not name or not parent:
        raise ExportError(f"--out {out}: expected a file path")
    try:
        Storage(parent).write_bytes(name, data)
    except (StorageError, OSError) as err:
        raise ExportError(f"--out {out}: cannot write ({' '.join(str(err).split())[:160]})") from None
    return out


def export_onnx(model_uri: str, out: str | None = None, opset: int = DEFAULT_OPSET,
                check: bool = True) -> tuple[str, float | None]:
    """Load the export at ``model_uri`` (as :func:`load_model`), write its ONNX file; returns ``(path, diff)``.

    ``out``: default :func:`default_out`. ``diff`` is :func:`check_onnx`'s max abs difference when
    ``check`` and onnxruntime is installed, else None. Raises ModelLoadError / ExportError (one line).
    """
    _require("onnx")
    loaded = load_model(model_uri)
    data = to_onnx(loaded, opset)
    diff = None
    if check:
        try:
            diff = check_onnx(data, loaded)
        except ExportError:  # onnxruntime is not installed: the file is still valid ONNX
            diff = None
    return write_bytes(out or default_out(loaded), data), diff
