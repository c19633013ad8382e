"""Exporting the winner and loading it back: files, preprocessing, predictions, typed errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import tans
from tans.data.reader import decode_images, to_float
from tans.selection.export import ModelLoadError, export_model, load_model, preprocess_images
from tans.selection.finetune import build_candidate, evaluate_accuracy, finetune, model_size
from tans.storage import Storage
from tans.zoo.subnets import Arch, sample_archs, smallest
from tans.zoo.supernets import get_family

from . import TINY, colour_task

FAM = get_family(TINY)
CLASSES = ["red", "green", "blue"]
FILES = ["model.pt", "model.safetensors", "config.json", "README.md", "model.json"]  # in the order written
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _exported(tmp_path, arch: Arch | None = None) -> tuple[str, torch.nn.Module, Arch]:
    arch = arch or sample_archs(FAM, 3, seed=4)[2]
    model = build_candidate(TINY, arch, 3, None, seed=0)
    uri = export_model(str(tmp_path / "root"), "searches/run/model", model, TINY, arch, CLASSES, 32, 3, {"k": 1})
    return uri, model, arch


@pytest.mark.timeout(60)
def test_export_then_load_reproduces_the_fine_tuned_model(monkeypatch):
    train, val, test = colour_task(48, seed=1), colour_task(24, seed=2), colour_task(40, seed=3)
    arch = sample_archs(FAM, 3, seed=1)[2]
    model = build_candidate(TINY, arch, 3, None, seed=0)
    finetune(model, train, val, None, epochs=2, batch_size=16, lr=0.1, seed=0)
    accuracy = evaluate_accuracy(model, test)
    with torch.no_grad():
        expected = model.eval()(to_float(test.images)).argmax(1)

    writes = []
    commit = Storage._commit
    monkeypatch.setattr(Storage, "_commit", lambda self, rel, data: (writes.append(rel), commit(self, rel, data))[1])
    storage = Storage()  # the default root ($TANS_ROOT, a temp dir in tests)
    uri = export_model(storage, "searches/run1/model", model, TINY, arch, CLASSES, image_size=32, channels=3,
                       extra={"val_accuracy": 0.5, "candidate": "m-1"})
    assert writes == [f"searches/run1/model/{name}" for name in FILES]  # model.json last
    assert uri == storage.uri_of("searches/run1/model")
    assert sorted(os.listdir(uri)) == sorted(FILES)  # no temp files left behind
    meta = json.loads(storage.read_bytes("searches/run1/model/model.json"))
    assert meta["family"] == TINY and Arch.from_dict(meta["arch"]) == arch
    assert meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert (meta["image_size"], meta["channels"]) == (32, 3)
    pre = meta["preprocessing"]
    assert pre["resize"]["size"] == [32, 32] and pre["range"] == [-1.0, 1.0]
    assert (pre["mean"], pre["std"]) == (0.5, 0.5)
    assert [meta["n_params"], meta["flops"]] == list(model_size(model, 32))
    assert meta["extra"] == {"val_accuracy": 0.5, "candidate": "m-1"}

    for where in (uri, "searches/run1/model", f"{uri}/model.json"):  # dir, path under the root, a file in it
        loaded = load_model(where)
        assert not loaded.model.training and loaded.arch == arch and loaded.classes == CLASSES
        assert (loaded.image_size, loaded.channels, loaded.num_classes, loaded.family) == (32, 3, 3, TINY)
        pred = loaded.predict(test.images)
        assert pred.dtype == torch.int64 and torch.equal(pred, expected)
        assert int((pred == test.labels).sum()) / len(test) == accuracy
        assert loaded.predict_classes(test.images[:4]) == [CLASSES[i] for i in expected[:4].tolist()]
        assert evaluate_accuracy(loaded.model, test) == accuracy
    # The lazy top-level re-export gives the same model.
    again = tans.load_model(uri)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), model.state_dict().values(),
                                                     strict=True))

    # Exporting again over it builds beside, then swaps: the new weights get their own name, and
    # until the new model.json lands the old export loads whole (a crash leaves old or new).
    # A model.onnx converted from the old weights goes before anything new is written.
    other = build_candidate(TINY, arch, 3, None, seed=9)
    (Path(uri) / "model.onnx").write_bytes(b"converted from the old weights")
    real_write_text = storage.write_text

    def crash(rel, text):
        raise KeyboardInterrupt("killed before the swap")

    storage.write_text = crash
    with pytest.raises(KeyboardInterrupt):
        export_model(storage, "searches/run1/model", other, TINY, arch, CLASSES, 32, 3, {})
    storage.write_text = real_write_text
    assert torch.equal(load_model(uri).model.classifier.linear.weight, model.classifier.linear.weight)
    assert not (Path(uri) / "model.onnx").exists()
    export_model(storage, "searches/run1/model", other, TINY, arch, CLASSES, 32, 3, {})
    assert torch.equal(load_model(uri).model.classifier.linear.weight, other.classifier.linear.weight)
    names = sorted(os.listdir(uri))
    assert len(names) == len(FILES) and "model.json" in names and "model.pt" not in names  # the old weights went
    final = json.loads((Path(uri) / "model.json").read_text())
    assert final["weights"] in names and final["weights"] == f"model-{final['export_id']}.pt"
    # the fixed-name files were rewritten for the new export: same id, same weights
    assert json.loads((Path(uri) / "config.json").read_text())["export_id"] == final["export_id"]
    with safe_open(str(Path(uri) / "model.safetensors"), "pt") as f:
        assert f.metadata()["tans.export_id"] == final["export_id"]
        assert torch.equal(f.get_tensor("classifier.linear.weight"), other.classifier.linear.weight)
    assert final["export_id"] in (Path(uri) / "README.md").read_text()


@pytest.mark.timeout(60)
def test_the_ecosystem_files_agree_with_model_json(tmp_path):
    arch = sample_archs(FAM, 3, seed=4)[2]
    model = build_candidate(TINY, arch, 3, None, seed=0)
    extra = {"constraints": {"max_params": 3_000_000, "max_flops": None, "family": None}, "val_accuracy": 0.75,
             "model_id": "m-7"}
    table = [{"model": "`m-7`", "params": 123_456, "val (%)": 75.0, "winner": True},
             {"model": "`m-2`", "params": 99_000, "val (%)": None, "winner": False}]
    uri = export_model(str(tmp_path / "root"), "x/model", model, TINY, arch, CLASSES, 32, 3, extra,
                       tables={"Fine-tuned candidates": table})
    d = Path(uri)
    meta = json.loads((d / "model.json").read_text())
    # model.safetensors: the same state dict as model.pt, tensor for tensor, tagged with the export
    pt = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    st = load_file(str(d / "model.safetensors"))
    assert sorted(st) == sorted(pt)
    assert all(torch.equal(st[k], pt[k]) and st[k].dtype == pt[k].dtype for k in pt)
    assert all(torch.equal(st[k], v) for k, v in model.state_dict().items())
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert f.metadata()["tans.export_id"] == meta["export_id"] and f.metadata()["format"] == "pt"
    # config.json: the same values as model.json (one dict builds both), in Hugging Face's names
    config = json.loads((d / "config.json").read_text())
    assert config["arch"] == meta["arch"] and Arch.from_dict(config["arch"]) == arch
    assert config["family"] == meta["family"] == TINY and config["class_names"] == meta["classes"] == CLASSES
    assert config["id2label"] == {"0": "red", "1": "green", "2": "blue"} and config["label2id"]["blue"] == 2
    assert config["num_labels"] == config["num_classes"] == meta["num_classes"] == 3
    assert (config["image_size"], config["num_channels"], config["input_shape"]) == (32, 3, [3, 32, 32])
    assert config["preprocessing"] == meta["preprocessing"]
    assert (config["n_params"], config["flops"], config["export_id"]) == (meta["n_params"], meta["flops"],
                                                                          meta["export_id"])
    assert config["weights"] == meta["safetensors"] == "model.safetensors"
    # the card: what it is, its budget, its size, the search's table, how to load it
    card = (d / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tans\n")
    assert all(f"`{c}`" in card for c in CLASSES) and "3-class" in card and "32 x 32" in card
    assert f"{meta['n_params']:,} parameters" in card and "parameters ≤ 3,000,000 (met" in card
    assert "## Fine-tuned candidates" in card and "| `m-7` | 123,456 | 75 | yes |" in card and "| — |" in card
    assert "load_model(" in card and "safetensors.torch import load_file" in card and meta["export_id"] in card
    # the safetensors snippet of the card works as written
    from tans.selection.finetune import build_structure

    net = build_structure(config["family"], Arch.from_dict(config["arch"]), config["num_labels"])
    net.load_state_dict(st)
    x = to_float(colour_task(4, seed=3).images)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), load_model(uri).model(x))
    # any file of the export names it for load_model
    assert load_model(str(d / "config.json")).arch == arch


@pytest.mark.timeout(60)
def test_preprocess_matches_the_training_pipeline():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8))
    assert torch.equal(preprocess_images(batch, 32, 3), to_float(batch))
    assert torch.equal(preprocess_images(batch[0], 32, 3), to_float(batch[:1]))  # one C x H x W image
    # Raw images of other sizes and modes go through exactly what ingest + reader did to training data.
    rgb = Image.fromarray(rng.integers(0, 256, size=(40, 44, 3), dtype=np.uint8), "RGB")
    grey = Image.fromarray(rng.integers(0, 256, size=(20, 24), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8), "RGBA")
    got = preprocess_images([rgb, grey, rgba], 32, 3)
    assert got.shape == (3, 3, 32, 32) and got.dtype == torch.float32
    assert float(got.min()) >= -1.0 and float(got.max()) <= 1.0
    for i, img in enumerate([rgb, grey, rgba]):
        assert torch.equal(got[i], to_float(decode_images([_png(img)], 32, 3))[0]), img.mode
    # numpy arrays (H x W x C, H x W, or a stacked N x H x W x C batch) are the same images.
    assert torch.equal(preprocess_images([np.asarray(rgb), np.asarray(grey)], 32, 3), got[:2])
    stacked = np.stack([np.asarray(rgba)] * 2)
    assert torch.equal(preprocess_images(stacked, 32, 3), torch.cat([got[2:]] * 2))
    assert torch.equal(preprocess_images(rgb, 32, 3), got[:1])  # a single image
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images(batch.float(), 32, 3)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images([np.zeros((8, 8, 3), dtype=np.float32)], 32, 3)
    with pytest.raises(ValueError, match="shape"):
        preprocess_images(torch.zeros(2, 5, 8, 8, dtype=torch.uint8), 32, 3)


@pytest.mark.timeout(60)
def test_load_errors_are_typed_one_liners(tmp_path):
    uri, model, arch = _exported(tmp_path)
    good_json = (tmp_path / "root/searches/run/model/model.json").read_text()
    good_pt = (tmp_path / "root/searches/run/model/model.pt").read_bytes()

    def variant(name: str, json_text: str | None = good_json, pt: bytes | None = good_pt) -> str:
        path = tmp_path / "variants" / name
        path.mkdir(parents=True)
        if json_text is not None:
            (path / "model.json").write_text(json_text)
        if pt is not None:
            (path / "model.pt").write_bytes(pt)
        return str(path)

    meta = json.loads(good_json)
    other_arch = smallest(FAM)
    assert other_arch != arch
    code = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "hook": shutil.rmtree}, code)  # a pickle that names a function
    cases = {
        str(tmp_path / "nowhere"): "no such directory",
        "searches/never-exported": "no such directory",
        variant("empty", None, None): "model.json is missing",
        variant("no-weights", pt=None): "model.pt is missing",
        variant("bad-json", json_text="{not json"): "not valid JSON",
        variant("list-json", json_text="[1, 2]"): "expected a JSON object",
        variant("no-arch", json_text=json.dumps({k: v for k, v in meta.items() if k != "arch"})): "missing key 'arch'",
        variant("bad-family", json_text=json.dumps(meta | {"family": "resnet"})): "cannot rebuild",
        variant("bad-count", json_text=json.dumps(meta | {"num_classes": 7})): "num_classes=7",
        variant("truncated", pt=good_pt[: len(good_pt) // 2]): "not a readable weights-only",
        variant("pickles-code", pt=code.getvalue()): "not a readable weights-only",
        variant("other-arch", json_text=json.dumps(meta | {"arch": other_arch.to_dict()})): "does not match",
        variant("more-classes", json_text=json.dumps(meta | {"classes": [*CLASSES, "x"], "num_classes": 4})):
            "another shape",
    }
    for where, needle in cases.items():
        with pytest.raises(ModelLoadError) as err:
            load_model(where)
        msg = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in msg and len(msg) < 400, msg
        assert needle in msg, (where, msg)
    assert not (tmp_path / "nowhere").exists()  # loading never creates directories
    # Exporting something inconsistent is refused before anything is written.
    with pytest.raises(ValueError, match="2 class names"):
        export_model(str(tmp_path / "root"), "bad", model, TINY, arch, ["a", "b"], 32, 3, {})
    with pytest.raises(ValueError, match="channels"):
        export_model(str(tmp_path / "root"), "bad", model, TINY, arch, CLASSES, 32, 1, {})
    assert not (tmp_path / "root" / "bad").exists()


@pytest.mark.timeout(120)
def test_loading_through_the_package_does_not_import_ray(tmp_path):
    uri, model, _ = _exported(tmp_path)
    code = (
        "import sys, torch\n"
        "import tans\n"
        f"m = tans.load_model({uri!r})\n"
        "x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)\n"
        "print(m.predict(x).tolist(), 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        expected = model.eval()(to_float(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))).argmax(1).tolist()
    assert out.stdout.split()[-1] == "False" and out.stdout.startswith(str(expected))


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_export_and_load_on_s3(s3_env):
    bucket = s3_env.make_bucket("tans-export-test")
    arch = sample_archs(FAM, 3, seed=6)[2]
    model = build_candidate(TINY, arch, 3, None, seed=1)
    uri = export_model(f"s3://{bucket}/root", "searches/s3run/model", model, TINY, arch, CLASSES, 32, 3, {})
    assert uri == f"s3://{bucket}/root/searches/s3run/model"
    loaded = load_model(uri)
    data = colour_task(12, seed=8)
    with torch.no_grad():
        expected = model.eval()(to_float(data.images)).argmax(1)
    assert torch.equal(loaded.predict(data.images), expected)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(f"s3://{bucket}/root/searches/missing")
