"""The fused layout (args.fused: the Ingress encodes and searches in its own process) on a real
Serve: the same answers as the library and as the split app, its Server-Timing, a space switch
through the Ingress's user_config, and a bad space that keeps the old one serving."""

from __future__ import annotations

import time

import pytest
import requests

from serve.deploy import app_config as config_with
from serve.deploy import apply_config
from serve.timing import parse_server_timing
from tans.data.tasks import encode_png
from tests.serve.conftest import LIMITS, running_app
from tests.serve.test_http import IMAGES, LABELS, assert_same, good_body, library_answer, post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def fused_config(root, space: str) -> dict:
    return config_with(space=space, args={"root": str(root), **LIMITS}, fused=True,
                       deployments={"Ingress": {"ray_actor_options": {"num_cpus": 0.3}}})


@pytest.fixture(scope="module")
def fused_url(serve_root, tmp_path_factory):
    with running_app(fused_config(serve_root, "runA"), tmp_path_factory) as url:
        yield url


def _deployments() -> set[str]:
    from ray import serve

    return set(serve.status().applications["tans"].deployments)


def test_fused_app_answers_as_the_library_with_one_deployment(fused_url, serve_root):
    assert _deployments() == {"Ingress"}
    r = post(fused_url, json=good_body())
    assert r.status_code == 200, r.text
    assert r.json()["space_run"] == "runA"
    assert_same(r.json(), library_answer(serve_root, "runA"))
    timing = parse_server_timing(r.headers["Server-Timing"])
    assert set(timing) == {"read", "decode", "encode", "encoder", "search", "index", "ingress"}
    assert 0 < timing["encoder"] <= timing["encode"] + 0.1 and 0 < timing["index"] <= timing["search"] + 0.1

    files = [("images", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(IMAGES)]
    r = post(fused_url, files=files, data={"labels": ",".join(map(str, LABELS)), "k": "12", "prior_weight": "0"})
    assert r.status_code == 200, r.text
    assert_same(r.json(), library_answer(serve_root, "runA", k=12, prior_weight=0.0))

    r = post(fused_url, json=good_body(max_params=1))  # nothing that small: 422, and the service stays up
    assert r.status_code == 422 and "error" in r.json()
    assert requests.get(f"{fused_url}/v1/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{fused_url}/v1/info", timeout=30).json()
    assert (info["space_run"], info["index_size"]) == ("runA", 12)
    assert requests.get(f"{fused_url}/v1/models/runA-t0-m0", timeout=30).json()["space_run"] == "runA"


def test_fused_app_switches_space_through_the_ingress_user_config(fused_url, serve_root):
    apply_config(fused_config(serve_root, "runB"))  # same code and args: the Ingress reconfigures in place
    deadline = time.monotonic() + 120
    while requests.get(f"{fused_url}/v1/info", timeout=30).json()["space_run"] != "runB":
        assert time.monotonic() < deadline, "the fused app never switched to runB"
        time.sleep(0.2)
    r = post(fused_url, json=good_body())
    assert r.status_code == 200 and r.json()["space_run"] == "runB"
    assert_same(r.json(), library_answer(serve_root, "runB"))

    apply_config(fused_config(serve_root, "no_such_run"))  # a bad space: the old one keeps serving
    deadline = time.monotonic() + 60
    while (info := requests.get(f"{fused_url}/v1/info", timeout=30).json())["reconfigure_error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert info["space_run"] == "runB" and "no_such_run" in info["reconfigure_error"]
    assert post(fused_url, json=good_body()).json()["space_run"] == "runB"


def test_split_layout_refuses_a_user_config_on_its_ingress(fused_url, serve_root):
    from ray import serve

    config = config_with(space="runA", args={"root": str(serve_root), **LIMITS},
                         deployments={"Ingress": {"user_config": {"space": "runA"}, "num_replicas": 1,
                                                  "autoscaling_config": None,
                                                  "ray_actor_options": {"num_cpus": 0.1}},
                                      "Encoder": {"ray_actor_options": {"num_cpus": 0.1}},
                                      "Index": {"ray_actor_options": {"num_cpus": 0.1}}})
    (app,) = config["applications"]
    app["name"], app["route_prefix"] = "tans-split-bad", "/split-bad"
    config["applications"] = [app, *fused_config(serve_root, "runB")["applications"]]  # keep the running app
    try:
        with pytest.raises(RuntimeError, match="args.fused"):
            apply_config(config, timeout_s=180)
    finally:
        serve.delete("tans-split-bad")
    assert post(fused_url, json=good_body()).json()["space_run"] == "runB"  # the other app stays up
