"""Supernet registry, building, and loading initial weights from checkpoints."""

from __future__ import annotations

import time

import pytest
import torch

from tans.zoo import supernets
from tans.zoo.supernets import (
    SupernetError,
    forward_features,
    get_family,
    list_families,
    load_initial_weights,
    new_head,
)


@pytest.mark.timeout(60)
def test_registry_and_unknown_family():
    assert {"ofa_mbv3_w1.0", "ofa_mbv3_w1.2", "ofa_mbv3_tiny"} <= set(list_families())
    fam = get_family("ofa_mbv3_w1.0")
    assert (fam.ks_choices, fam.e_choices, fam.d_choices) == ((3, 5, 7), (3, 4, 6), (2, 3, 4))
    with pytest.raises(SupernetError) as err:
        get_family("resnet9000")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert "resnet9000" in msg and "ofa_mbv3_w1.0" in msg and "ofa_mbv3_tiny" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ofa_mbv3_w1.0", "ofa_mbv3_w1.2", "ofa_mbv3_tiny"])
def test_penultimate_dim_is_the_real_classifier_input(name):
    fam = get_family(name)
    model = fam.build(7).eval()
    assert model.classifier.linear.in_features == fam.penultimate_dim
    assert model.classifier.linear.out_features == 7
    assert len(model.block_group_info) == 5 and model.runtime_depth == [fam.max_depth] * 5


@pytest.mark.timeout(30)
def test_tiny_builds_and_runs_fast_at_32px():
    fam = get_family("ofa_mbv3_tiny")
    start = time.perf_counter()
    model = fam.build(4).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        feats = forward_features(model, torch.randn(2, 3, 32, 32))
    assert time.perf_counter() - start < 1.0
    assert logits.shape == (2, 4) and feats.shape == (2, fam.penultimate_dim)


@pytest.mark.timeout(30)
def test_new_head_replaces_classifier_only():
    model = get_family("ofa_mbv3_tiny").build(4, dropout=0.1)
    body = model.first_conv.conv.weight.clone()
    new_head(model, 9)
    assert model.classifier.linear.out_features == 9 and model.classifier.dropout_rate == 0.1
    assert torch.equal(model.first_conv.conv.weight, body)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 9)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give every float tensor distinctive values, so a copy is detectable."""
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                t.copy_(torch.full_like(t, 0.01 * (i + 1)))
    return model


@pytest.mark.timeout(60)
def test_checkpoint_round_trip_same_head(tmp_path):
    fam = get_family("ofa_mbv3_tiny")
    src = _trained_like(fam.build(4))
    path = tmp_path / "base.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    dst = fam.build(4)
    report = load_initial_weights(dst, str(path))
    assert report["loaded"] == len(src.state_dict()) and report["skipped"] == [] and report["missing"] == []
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


@pytest.mark.timeout(60)
def test_checkpoint_other_head_size_is_skipped(tmp_path):
    fam = get_family("ofa_mbv3_tiny")
    src = _trained_like(fam.build(10))
    path = tmp_path / "raw.pt"
    torch.save(src.state_dict(), path)  # a raw state dict, with a "file://" URI
    dst = fam.build(3)
    head_before = dst.classifier.linear.weight.clone()
    report = load_initial_weights(dst, f"file://{path}")
    assert sorted(report["skipped"]) == ["classifier.linear.bias", "classifier.linear.weight"]
    assert torch.equal(dst.classifier.linear.weight, head_before)  # the new task keeps its head
    assert torch.equal(dst.first_conv.conv.weight, src.first_conv.conv.weight)
    assert report["loaded"] == len(src.state_dict()) - 2


@pytest.mark.timeout(60)
def test_ddp_prefix_and_ofa_legacy_names_are_understood(tmp_path):
    fam = get_family("ofa_mbv3_tiny")
    src = _trained_like(fam.build(4))
    # The released OFA checkpoints name MBConv layers ".mobile_inverted_conv." and DDP adds "module.".
    state = {
        "module." + k.replace(".conv.", ".mobile_inverted_conv.", 1) if k.startswith("blocks.") else "module." + k: v
        for k, v in src.state_dict().items()
    }
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": state}, path)
    dst = fam.build(4)
    assert load_initial_weights(dst, str(path))["loaded"] == len(state)
    assert torch.equal(dst.blocks[3].conv.depth_conv.conv.conv.weight, src.blocks[3].conv.depth_conv.conv.conv.weight)


@pytest.mark.timeout(60)
def test_bad_checkpoints_are_one_line_errors(tmp_path):
    model = get_family("ofa_mbv3_tiny").build(4)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"w": torch.zeros(3)}, unrelated)
    other_family = tmp_path / "w1.pt"
    torch.save(get_family("ofa_mbv3_w1.0").build(4).state_dict(), other_family)
    cases = {
        str(corrupt): "not a readable",
        str(tmp_path / "missing.pt"): "could not read checkpoint",
        str(unrelated): "no tensor matches",
        str(other_family): "another family",
        "gs://bucket/x.pt": "could not read checkpoint",
    }
    for uri, expected in cases.items():
        with pytest.raises(SupernetError) as err:
            load_initial_weights(model, uri)
        assert expected in str(err.value) and "\n" not in str(err.value), (uri, str(err.value))


@pytest.mark.timeout(60)
def test_checkpoint_that_pickles_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": get_family("ofa_mbv3_tiny").build(4).state_dict(), "hook": print}, path)
    with pytest.raises(SupernetError, match="weights-only"):
        load_initial_weights(get_family("ofa_mbv3_tiny").build(4), str(path))


@pytest.mark.timeout(30)
def test_ofa_download_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # The real download path, pointed at a closed local port: fails at once, offline or not.
    from tests.conftest import free_port

    monkeypatch.setattr(supernets, "OFA_URL_BASE", f"http://127.0.0.1:{free_port()}/")
    model = get_family("ofa_mbv3_w1.0").build(1000)
    start = time.perf_counter()
    with pytest.raises(SupernetError) as err:
        load_initial_weights(model, "ofa:ofa_mbv3_d234_e346_k357_w1.0")
    msg = str(err.value)
    assert time.perf_counter() - start < 10
    assert msg.startswith("could not download ofa:ofa_mbv3_d234_e346_k357_w1.0 (") and "\n" not in msg
    assert "pass its path or s3:// URI instead" in msg
    assert not (tmp_path / "torch" / "ofa_nets" / "ofa_mbv3_d234_e346_k357_w1.0").exists()  # no half file
    with pytest.raises(SupernetError, match="unknown OFA net id 'ofa_mbv3_typo'"):
        load_initial_weights(model, "ofa:ofa_mbv3_typo")


@pytest.mark.timeout(30)
def test_ofa_weights_load_through_the_cache(monkeypatch, tmp_path):
    """A checkpoint in OFA's format, served by a stubbed download, loads like the real one would."""
    fam = get_family("ofa_mbv3_tiny")
    src = _trained_like(fam.build(1000))
    state = {k.replace(".conv.", ".mobile_inverted_conv.", 1) if k.startswith("blocks.") else k: v
             for k, v in src.state_dict().items()}
    path = tmp_path / "ofa.pt"
    torch.save({"state_dict": state}, path)
    calls = []
    monkeypatch.setattr(supernets, "_download_ofa", lambda net_id: calls.append(net_id) or path.read_bytes())
    dst = fam.build(10)
    report = load_initial_weights(dst, "ofa:ofa_mbv3_d234_e346_k357_w1.2")
    assert calls == ["ofa_mbv3_d234_e346_k357_w1.2"] and report["loaded"] == len(state) - 2
    assert torch.equal(dst.final_expand_layer.conv.weight, src.final_expand_layer.conv.weight)


@pytest.mark.timeout(60)
def test_modelling_modules_do_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, tans.zoo.supernets, tans.zoo.subnets, tans.zoo.measure, tans.zoo.elastic; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
