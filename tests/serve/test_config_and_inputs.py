"""serve/config.yaml through Serve's own schema, `tans serve` errors, and the input rules (no Ray started)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from serve.inputs import ApiError, decode_base64, decode_image, parse_multipart_request, task_name_of
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.timeout(120)
CONFIG = REPO / "serve" / "config.yaml"


def _find_keys(node, key) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _find_keys(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find_keys(v, key)]
    return []


def test_config_is_a_valid_serve_config_with_no_host_and_builds():
    from ray._common.utils import import_attr  # what `serve run` uses to resolve import_path
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert not _find_keys(raw, "host") and "http_options" not in raw
    (app,) = schema.applications
    assert app.import_path == "serve.app:app_builder"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Encoder", "Index", "Ingress"}
    assert all(d.autoscaling_config and d.autoscaling_config["min_replicas"] >= 1 for d in deployments.values())
    # one space, applied by every deployment that depends on it
    assert deployments["Encoder"].user_config["space"] == deployments["Index"].user_config["space"]
    # the args validate into AppArgs and the builder makes the three-deployment app
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="max_k"):
        call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), {**app.args, "max_k": 0})


def test_config_listens_on_all_interfaces_so_it_needs_the_token_or_an_explicit_proxy(monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    import serve.app
    from serve.args import ExposureError

    text = CONFIG.read_text()
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    assert app.args["behind_auth_proxy"] is False and app.args["auth_token_env"] == "TANS_SERVE_TOKEN"
    assert "behind_auth_proxy" in text.split("applications:")[0]  # the header says when to set it
    assert app.args["max_pixels_per_request"] == 64_000_000 and app.args["max_queued_requests"] < min(
        d.max_ongoing_requests for d in app.deployments if d.name == "Ingress")
    builder = import_attr(app.import_path)
    # `serve run`/KubeRay start Serve on the schema's default host first; the builder reads it
    monkeypatch.setattr(serve.app, "serving_host", lambda: "0.0.0.0")
    monkeypatch.delenv("TANS_SERVE_TOKEN", raising=False)
    with pytest.raises(ExposureError, match="refusing to serve on 0.0.0.0"):
        call_user_app_builder_with_args_if_necessary(builder, app.args)
    assert type(call_user_app_builder_with_args_if_necessary(
        builder, {**app.args, "behind_auth_proxy": True})).__name__ == "Application"
    monkeypatch.setenv("TANS_SERVE_TOKEN", "s3cret-token")
    assert type(call_user_app_builder_with_args_if_necessary(builder, app.args)).__name__ == "Application"


def test_build_app_hands_the_ingress_a_hash_of_the_token_from_the_environment(monkeypatch):
    import hashlib

    from serve.app import build_app
    from serve.args import AppArgs

    monkeypatch.setenv("TANS_TEST_TOKEN_ENV", "s3cret-token")
    ingress = build_app(AppArgs(auth_token_env="TANS_TEST_TOKEN_ENV"))._bound_deployment
    assert ingress.init_args[3] == hashlib.sha256(b"s3cret-token").hexdigest()
    assert "s3cret-token" not in repr(ingress.init_args)
    monkeypatch.delenv("TANS_TEST_TOKEN_ENV")
    assert build_app(AppArgs(auth_token_env="TANS_TEST_TOKEN_ENV"))._bound_deployment.init_args[3] is None


@pytest.mark.parametrize("space_args", [[], ["--space", "/nonexistent/spaces/x"]])
def test_tans_serve_with_a_missing_space_is_one_line_and_exit_1(tmp_path, space_args):
    proc = run_cli("serve", "--root", str(tmp_path / "empty"), *space_args, timeout=100)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "space" in lines[0], proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # failed before starting anything


def test_dataset_names_cannot_leave_the_storage_root():
    root = "/data/tans"
    assert task_name_of("fashion_0_5", root) == "fashion_0_5"
    assert task_name_of("tasks/fashion_0_5", root) == "fashion_0_5"
    assert task_name_of("/data/tans/tasks/fashion_0_5/", root) == "fashion_0_5"
    for bad in ("../../etc", "..", ".hidden", "/etc/passwd", "tasks/../x", "/data/tans/tasks/../../etc",
                "/data/other/tasks/x", "s3://bucket/tasks/x", "a/b", "", "x" * 200):
        with pytest.raises(ApiError) as err:
            task_name_of(bad, root)
        assert err.value.status == 400


def _png(size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 100).save(buf, format="PNG")
    return buf.getvalue()


def test_the_service_ranks_with_the_prior_weight_tans_search_uses_by_default():
    from serve.args import AppArgs
    from tans.job_configs import SearchConfig
    from tans.space.prior import DEFAULT_PRIOR_WEIGHT

    assert AppArgs().prior_weight == SearchConfig().prior_weight == DEFAULT_PRIOR_WEIGHT > 0


def test_image_decoding_rules():
    assert decode_image(_png(), 0, 64).shape == (3, 16, 16)
    assert decode_image(_png(mode="L"), 0, 64).shape == (3, 16, 16)  # grey -> RGB
    assert decode_image(_png(mode="RGBA", size=(10, 12)), 0, 64).shape == (3, 12, 10)  # alpha dropped
    assert decode_image(_png(mode="P"), 0, 64).shape == (3, 16, 16)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(noisy, format="PNG")
    cases = [(b"GIF89a" + b"\0" * 20, 400, "images[3]"), (noisy.getvalue()[:300], 400, "truncated"),
             (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, 400, "images[3]"), (_png((100, 10)), 413, "64 px")]
    for data, status, text in cases:
        with pytest.raises(ApiError) as err:
            decode_image(data, 3, 64)
        assert err.value.status == status and text in err.value.message
    assert decode_base64("data:image/png;base64," + "aGk=", 0) == b"hi"
    with pytest.raises(ApiError, match="base64"):
        decode_base64("a b c !", 0)


def test_multipart_parsing_keeps_binary_parts_intact():
    png = _png()
    prepared = requests.Request(
        "POST",
        "http://127.0.0.1/",
        files=[("images", ("a.png", png, "image/png")), ("images", ("b.png", png + b"\r\n--x", "image/png"))],
        data={"labels": ["0", "1"], "k": "3", "family": "ofa_mbv3_tiny", "prior_weight": "0.5"},
    ).prepare()
    req, files = parse_multipart_request(prepared.body, prepared.headers["Content-Type"])
    assert files == [png, png + b"\r\n--x"]
    assert req.labels == [0, 1] and req.k == 3 and req.family == "ofa_mbv3_tiny" and req.prior_weight == 0.5
    with pytest.raises(ApiError, match="boundary"):
        parse_multipart_request(b"", "multipart/form-data")


def test_resizing_matches_the_library_extractor():
    from serve.deployments import to_model_input
    from tans.space.features import ExtractorSpec, build_extractor

    ex = build_extractor(ExtractorSpec(kind="supernet", uri="", family="ofa_mbv3_tiny", image_size=32))
    x = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch, resized = to_model_input(x.numpy(), 32)
    one_by_one, resized_list = to_model_input([im for im in x.numpy()], 32)
    assert resized == resized_list == 5 and torch.equal(batch, one_by_one)
    assert torch.allclose(ex(batch), ex(x), atol=1e-5)  # the library resizes inside the extractor


def test_space_versions_keep_the_previous_space_for_pinned_requests():
    from serve.spaces import SpaceVersions

    class S:
        def __init__(self, uri):
            self.uri = uri

    v = SpaceVersions(keep=2)
    a, b, c = S("a"), S("b"), S("c")
    v.install(a)
    v.install(b)
    assert v.get(None) is b and v.get("a") is a and v.get("b") is b
    v.install(c)
    assert v.get(None) is c and v.get("a") is None and v.get("b") is b and v.uris() == ["b", "c"]
    np.testing.assert_equal(v.keep, 2)


class _Side:
    """A fake Encoder or Index replica: the spaces it holds, the first one current."""

    def __init__(self, *held):
        self.held = list(held)
        self.calls = []

    async def encode(self, pin):
        self.calls.append(pin)
        uri = pin or self.held[0]
        return {"space_uri": uri} if uri in self.held else {"missing": pin}

    async def search(self, encoded):
        self.calls.append(encoded["space_uri"])
        uri = encoded["space_uri"]
        return {"space_uri": uri} if uri in self.held else {"missing": uri, "current": self.held[0]}


def _one_space(encoder, index, timeout_s=1.0):
    import asyncio

    from serve.spaces import with_one_space

    return asyncio.run(with_one_space(encoder.encode, index.search, timeout_s, poll_s=0.01))


def test_a_request_uses_one_space_whichever_side_switched_first():
    from serve.spaces import SpaceSwitchTimeout

    # encoder already on B (keeps A), index still on A: the second try is pinned to A
    enc, idx = _Side("B", "A"), _Side("A")
    assert _one_space(enc, idx) == ({"space_uri": "A"}, {"space_uri": "A"}) and enc.calls == [None, "A"]
    # index already on B (keeps A), encoder still on A: answered by A at once
    enc, idx = _Side("A"), _Side("B", "A")
    assert _one_space(enc, idx)[1] == {"space_uri": "A"} and enc.calls == [None]
    # a fresh encoder replica holds only B, the index only A: wait until the index has B
    enc, idx = _Side("B"), _Side("A")
    original = idx.search

    async def search_then_switch(encoded):
        if len(idx.calls) == 3:
            idx.held = ["B", "A"]
        return await original(encoded)

    idx.search = search_then_switch
    assert _one_space(enc, idx)[1] == {"space_uri": "B"}
    # never a common space: a clear timeout, not a mixed answer
    with pytest.raises(SpaceSwitchTimeout):
        _one_space(_Side("B"), _Side("A"), timeout_s=0.1)
