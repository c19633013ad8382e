"""`tans export --onnx`: the ONNX file onnxruntime runs matches PyTorch; bad inputs are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import cli
from tans.selection.export import export_model, load_model
from tans.selection.finetune import build_candidate
from tans.zoo.subnets import sample_archs
from tans.zoo.supernets import get_family

from . import TINY, colour_task

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """A tiny subnet with weights far from their init (so the logits are not all near zero)."""
    arch = sample_archs(get_family(TINY), 3, seed=4)[2]
    model = build_candidate(TINY, arch, 3, None, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
    root = tmp_path_factory.mktemp("onnx")
    return export_model(str(root), "run/model", model, TINY, arch, CLASSES, 32, 3, {"model_id": "m-1"})


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.timeout(60)
def test_onnx_matches_pytorch_with_a_dynamic_batch(exported, capsys):
    assert cli.main(["export", "--model", exported, "--onnx"]) == 0
    out = capsys.readouterr().out
    path = f"{exported}/model.onnx"  # default: beside the export
    assert f"written to {path}" in out and "max |logit difference|" in out

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(Path(exported, "model.json").read_text())
    assert json.loads(props["tans.preprocessing"]) == meta["preprocessing"]
    assert json.loads(props["tans.classes"]) == CLASSES and props["tans.export_id"] == meta["export_id"]
    assert (props["tans.image_size"], props["tans.channels"], props["tans.family"]) == ("32", "3", TINY)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]

    loaded = load_model(exported)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    images = colour_task(6, seed=5).images  # raw uint8 test images
    for batch in (images, images[:1]):  # 6, then 1: the batch axis is dynamic
        x = loaded.preprocess(batch)
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            expected = loaded.model.eval()(x).numpy()
        assert got.shape == (len(batch), 3)
        diff = float(np.abs(got - expected).max())
        print(f"onnxruntime vs PyTorch, batch {len(batch)}: max abs diff {diff:.3g}")
        assert diff < 1e-4, diff
        assert float(np.abs(expected).max()) > 1e-2  # real logits, not a trivially zero output
        assert np.array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.timeout(60)
def test_out_paths_and_one_line_errors(exported, tmp_path, capsys, monkeypatch):
    target = tmp_path / "sub" / "m.onnx"
    target.parent.mkdir()
    assert cli.main(["export", "--model", exported, "--onnx", "--out", str(target), "--no-check"]) == 0
    assert target.is_file() and "max |logit" not in capsys.readouterr().out
    assert cli.main(["export", "--model", exported, "--onnx", "--out", str(tmp_path / "sub"), "--no-check"]) == 0
    assert (tmp_path / "sub" / "model.onnx").is_file()  # a directory gets model.onnx inside
    capsys.readouterr()

    cases = [
        (["--model", str(tmp_path / "nowhere"), "--onnx"], "no such directory"),
        (["--model", str(tmp_path / "sub"), "--onnx"], "model.json is missing"),
        (["--model", exported, "--onnx", "--out", str(tmp_path / "no" / "dir" / "m.onnx")], "no such directory"),
    ]
    for args, needle in cases:
        assert cli.main(["export", *args]) == 1
        assert needle in _one_line_error(capsys)
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "no").exists()

    with pytest.raises(SystemExit) as exc:  # no format asked for: a usage error
        cli.main(["export", "--model", exported])
    assert exc.value.code == 2 and "--onnx" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    assert cli.main(["export", "--model", exported, "--onnx", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "pip install 'tans[export]'" in _one_line_error(capsys)
    assert not (tmp_path / "x.onnx").exists()
