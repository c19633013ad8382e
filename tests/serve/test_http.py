"""The HTTP API against a real Serve app: library-equal answers, every bad input's 4xx, auth, and a
space switch under load in which every request is answered entirely by one space."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from serve.deploy import apply_config
from serve.timing import parse_server_timing
from serve.toy import toy_images
from tans.data.tasks import encode_png
from tans.space.prior import DEFAULT_PRIOR_WEIGHT
from tests.serve.conftest import LIMITS, app_config

pytestmark = pytest.mark.timeout(420)  # the first test also starts Ray and Serve (minutes on a busy 2-core machine)

IMAGES, LABELS = toy_images(n_classes=3, per_class=4, seed=7)  # 12 RGB images, 32 px (the extractor's size)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_b64(images) -> list[str]:
    return [b64(encode_png(im)) for im in images]


def good_body(**kw) -> dict:
    return {"images": png_b64(IMAGES), "labels": LABELS.tolist(), "k": 5, **kw}


def library_answer(root, run: str, images=IMAGES, labels=LABELS, **kw):
    from tans.space.retrieval import Retriever

    return Retriever.load(str(root / "spaces" / run)).retrieve_images(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, **{"k": 5, **kw})


def assert_same(http: dict, lib) -> None:
    assert [c["model_id"] for c in http["candidates"]] == [c.model_id for c in lib.candidates]
    for h, c in zip(http["candidates"], lib.candidates):
        assert h["similarity"] == pytest.approx(c.similarity, abs=1e-5)
        assert h["predicted_accuracy"] == pytest.approx(c.predicted_accuracy, abs=1e-5)
        assert (h["task"], h["n_params"], h["flops"]) == (c.task, c.n_params, c.flops)
    assert http["note"] == lib.note and http["returned_k"] == lib.returned_k


def post(url, **kw):
    return requests.post(f"{url}/v1/retrieve", timeout=60, **kw)


def test_retrieval_equals_the_library_for_json_multipart_and_dataset(serve_url, serve_root):
    r = post(serve_url, json=good_body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["space_run"] == "runA" and out["n_images"] == 12 and out["n_classes"] == 3 and out["resized"] == 0
    assert_same(out, library_answer(serve_root, "runA"))
    # Server-Timing: the Ingress's phases and, inside the two calls, the deployments' own time
    timing = parse_server_timing(r.headers["Server-Timing"])
    assert set(timing) == {"read", "decode", "encode", "encoder", "search", "index", "ingress"} and "ms" not in out
    assert 0 < timing["encoder"] <= timing["encode"] + 0.1 and 0 < timing["index"] <= timing["search"] + 0.1
    assert timing["ingress"] >= timing["read"] + timing["decode"] + timing["encode"] + timing["search"] - 0.4
    # ranked as `tans search` ranks: the nearest-dataset prior blended in at the service's default
    assert out["prior_weight"] == DEFAULT_PRIOR_WEIGHT

    # constraints, the space alone and no re-rank, same as the library
    lib = library_answer(serve_root, "runA", k=20, max_params=600_000, rerank=False, prior_weight=0)
    r = post(serve_url, json=good_body(k=20, max_params=600_000, rerank=False, prior_weight=0))
    assert r.status_code == 200, r.text
    assert_same(r.json(), lib)
    assert r.json()["prior_weight"] == 0.0
    assert r.json()["constraints"]["max_params"] == 600_000 and "only" in r.json()["note"]

    # the same query as a multipart upload
    files = [("images", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(IMAGES)]
    r = post(serve_url, files=files, data={"labels": ",".join(map(str, LABELS)), "k": "5"})
    assert r.status_code == 200, r.text
    assert_same(r.json(), library_answer(serve_root, "runA"))
    r = post(serve_url, files=files, data={"labels": ",".join(map(str, LABELS)), "k": "12", "prior_weight": "3"})
    assert r.status_code == 200, r.text
    assert_same(r.json(), library_answer(serve_root, "runA", k=12, prior_weight=3.0))
    assert r.json()["prior_weight"] == 3.0

    # a dataset in the storage root (by name and by full URI): a seeded sample per class
    from serve.inputs import dataset_query
    from tans.storage import Storage

    q = dataset_query(Storage(str(serve_root)), "toytask", "train", 3, 0, 64, 512)
    lib = library_answer(serve_root, "runA", images=q.images.transpose(0, 2, 3, 1), labels=q.labels)
    for name in ("toytask", f"{serve_root}/tasks/toytask"):
        r = post(serve_url, json={"dataset": name, "per_class": 3, "k": 5})
        assert r.status_code == 200, r.text
        assert_same(r.json(), lib)
        assert r.json()["n_images"] == 9 and r.json()["resized"] == 9  # 24 px task -> 32 px extractor


def test_info_models_and_docs(serve_url, serve_root):
    info = requests.get(f"{serve_url}/v1/info", timeout=30).json()
    assert info["space_run"] == "runA" and info["index_size"] == 12 and info["families"] == ["ofa_mbv3_tiny"]
    assert info["extractor"]["kind"] == "supernet" and info["image_size"] == 32 and info["api_version"] == "v1"
    r = requests.get(f"{serve_url}/v1/models/runA-t1-m2", timeout=30)
    assert r.status_code == 200 and r.json()["space_run"] == "runA"
    row = r.json()["model"]
    assert row["model_id"] == "runA-t1-m2" and len(row["ks"]) == 20 and "embedding" not in row
    with_emb = requests.get(f"{serve_url}/v1/models/runA-t1-m2?embedding=true", timeout=30).json()["model"]
    assert len(with_emb["embedding"]) == 8
    spec = requests.get(f"{serve_url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/retrieve"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert {"/v1/info", "/v1/healthz", "/v1/models/{model_id}"} <= set(spec["paths"])


def _png_bytes(size=(32, 32), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _bad_cases(root) -> list[tuple[str, dict, int, str]]:
    """(case, requests kwargs, status, text the error must contain)."""
    from tans.space.retrieval import Retriever

    r = Retriever.load(str(root / "spaces" / "runA"))
    smallest = str(r.model_ids[r.smallest_model()])
    imgs, labels = png_b64(IMAGES), LABELS.tolist()
    truncated = b64(encode_png(IMAGES[0])[:200])
    many = [b64(_png_bytes((8, 8)))] * (LIMITS["max_images"] + 1)
    return [
        ("not json", {"data": b"{images: nope", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ("json array", {"json": [1, 2]}, 400, "JSON object"),
        ("empty object", {"json": {}}, 400, "required"),
        ("no labels", {"json": {"images": imgs}}, 400, "labels"),
        ("k is a string", {"json": good_body(k="5")}, 400, "k: "),
        ("labels are strings", {"json": {"images": imgs, "labels": ["a"] * 12}}, 400, "labels.0: "),
        ("images not a list", {"json": {"images": 5, "labels": labels}}, 400, "images: "),
        ("unknown field", {"json": good_body(kk=1)}, 400, "unknown field"),
        ("not base64", {"json": {"images": ["!!!"] + imgs[1:], "labels": labels}}, 400, "base64"),
        ("not an image", {"json": {"images": [b64(b"hello world")] + imgs[1:], "labels": labels}}, 400,
         "not a PNG or JPEG"),
        ("truncated png", {"json": {"images": [truncated] + imgs[1:], "labels": labels}}, 400, "truncated"),
        ("gif", {"json": {"images": [b64(_png_bytes(fmt="GIF"))] + imgs[1:], "labels": labels}}, 400, "GIF"),
        ("one class", {"json": {"images": imgs, "labels": [0] * 12}}, 400, "2 classes"),
        ("label count", {"json": {"images": imgs, "labels": labels[:-1]}}, 400, "12 images but 11 labels"),
        ("negative label", {"json": {"images": imgs, "labels": [-1] + labels[1:]}}, 400, "labels.0: "),
        ("too many images", {"json": {"images": many, "labels": [i % 2 for i in range(len(many))]}}, 413, "limit"),
        ("body too large", {"data": b"{" + b" " * 300_000 + b"}", "headers": {"content-type": "application/json"}},
         413, "limit"),
        ("image too large", {"json": {"images": [b64(_png_bytes((600, 8)))] + imgs[1:], "labels": labels}}, 413,
         "512"),
        ("pixel budget", {"json": {"images": [b64(_png_bytes((150, 150)))] * 12, "labels": labels}}, 413,
         "200,000 pixels per request"),
        ("k zero", {"json": good_body(k=0)}, 400, "k: "),
        ("k negative", {"json": good_body(k=-3)}, 400, "k: "),
        ("k absurd", {"json": good_body(k=10**6)}, 400, "max_k"),
        ("negative max_params", {"json": good_body(max_params=-1)}, 400, "max_params"),
        ("negative max_flops", {"json": good_body(max_flops=-5)}, 400, "max_flops"),
        ("negative prior_weight", {"json": good_body(prior_weight=-1)}, 400, "prior_weight"),
        ("prior_weight a string", {"json": good_body(prior_weight="1")}, 400, "prior_weight"),
        ("prior_weight not a number (form)", {"files": [("images", ("a.png", encode_png(IMAGES[0]), "image/png"))],
                                              "data": {"labels": "0", "prior_weight": "nan"}}, 400, "prior_weight"),
        ("unsatisfiable", {"json": good_body(max_params=10)}, 422, smallest),
        ("unknown family", {"json": good_body(family="resnet")}, 422, smallest),
        ("images and dataset", {"json": good_body(dataset="toytask")}, 400, "not both"),
        ("unknown dataset", {"json": {"dataset": "no_such_task"}}, 404, "no_such_task"),
        ("dataset escapes root", {"json": {"dataset": "../../etc"}}, 400, "not a task name"),
        ("dataset absolute path", {"json": {"dataset": "/etc/passwd"}}, 400, "not a task name"),
        ("dataset dot-dot name", {"json": {"dataset": ".."}}, 400, "not a task name"),
        ("dataset via tasks/..", {"json": {"dataset": "tasks/../spaces"}}, 400, "not a task name"),
        ("dataset with labels", {"json": {"dataset": "toytask", "labels": [0, 1]}}, 400, "labels"),
        ("per_class too big", {"json": {"dataset": "toytask", "per_class": 11}}, 400, "per_class"),
        ("multipart without labels", {"files": [("images", ("a.png", _png_bytes(), "image/png"))] * 2}, 400,
         "labels"),
        ("multipart bad k", {"files": [("images", ("a.png", _png_bytes(), "image/png"))] * 2,
                             "data": {"labels": "0,1", "k": "many"}}, 400, "k: "),
    ]


def test_every_bad_request_gets_its_4xx_and_the_service_stays_up(serve_url, serve_root, ledger):
    failures = []
    for case, kwargs, status, text in _bad_cases(serve_root):
        ledger.bad_input()
        r = post(serve_url, **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or text not in body.get("error", ""):
            failures.append(f"{case}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # other routes
    r = requests.get(f"{serve_url}/v1/models/no-such-model", timeout=30)
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]
    r = requests.get(f"{serve_url}/v1/models/runA-t0-m0?embedding=maybe", timeout=30)
    assert r.status_code == 400 and "embedding" in r.json()["error"]
    r = requests.get(f"{serve_url}/v2/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    ledger.bad_input(3)
    # still up and still right
    r = post(serve_url, json=good_body())
    assert r.status_code == 200 and r.json()["space_run"] == "runA"


def test_images_of_other_sizes_and_modes_are_converted_and_resized(serve_url, serve_root):
    grey = [np.asarray(Image.fromarray(im).convert("L").resize((20, 20))) for im in IMAGES[:6]]
    rgba = [np.asarray(Image.fromarray(im).convert("RGBA").resize((40, 48))) for im in IMAGES[6:]]
    r = post(serve_url, json={"images": png_b64(grey + rgba), "labels": LABELS.tolist(), "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["resized"] == 12 and r.json()["returned_k"] == 3
    jpeg = io.BytesIO()
    Image.fromarray(IMAGES[0]).save(jpeg, format="JPEG")
    r = post(serve_url, json={"images": [b64(jpeg.getvalue())] + png_b64(IMAGES[1:]), "labels": LABELS.tolist()})
    assert r.status_code == 200, r.text


def test_bearer_token_auth(serve_url, serve_root):
    import hashlib

    from ray import serve

    from serve.app import Ingress
    from serve.args import AppArgs

    # A second ingress with a token, in front of the running app's Encoder and Index (starting one
    # replica, not three). It gets what build_app hands over: the token's hash, never the token
    # (tests/serve/test_config_and_inputs.py checks build_app reads it from the environment).
    token = "s3cret-token"
    args = AppArgs(root=str(serve_root), auth_token_env="TANS_TEST_UNSET_TOKEN_ENV")
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.1}, num_replicas=1, autoscaling_config=None).bind(
        serve.get_deployment_handle("Encoder", "tans"), serve.get_deployment_handle("Index", "tans"), args,
        hashlib.sha256(token.encode()).hexdigest())
    serve.run(ingress, name="tans-auth", route_prefix="/auth")
    base = f"{serve_url}/auth"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {b64(token.encode())}"}):
            r = requests.get(f"{base}/v1/info", headers=headers, timeout=30)
            assert r.status_code == 401 and "token" in r.json()["error"], r.text
            assert r.headers["www-authenticate"] == "Bearer"
            assert post(base, json=good_body(), headers=headers).status_code == 401
            assert requests.get(f"{base}/v1/models/runA-t0-m0", headers=headers, timeout=30).status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{base}/v1/info", headers=ok, timeout=30).status_code == 200
        r = post(base, json=good_body(), headers=ok)
        assert r.status_code == 200 and r.json()["space_run"] == "runA"
        assert requests.get(f"{base}/v1/healthz", timeout=30).status_code == 200  # probes need no token
        for path in ("/docs", "/redoc", "/openapi.json"):  # the API docs need it too
            assert requests.get(f"{base}{path}", timeout=30).status_code == 401, path
            assert requests.get(f"{base}{path}", headers=ok, timeout=30).status_code == 200, path
        assert "/v1/retrieve" in requests.get(f"{base}/openapi.json", headers=ok, timeout=30).json()["paths"]
        # the main app has no token configured: open
        assert requests.get(f"{serve_url}/v1/info", timeout=30).status_code == 200
        assert requests.get(f"{serve_url}/docs", timeout=30).status_code == 200
    finally:
        serve.delete("tans-auth")


def test_reconfigure_switches_space_without_dropping_or_mixing(serve_url, serve_root):
    answers = {run: library_answer(serve_root, run) for run in ("runA", "runB")}
    results, stop = [], threading.Event()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{serve_url}/v1/retrieve", json=good_body(), timeout=120)
                results.append((r.status_code, r.json() if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        t_switch = time.monotonic()
        apply_config(app_config(serve_root, "runB"))  # same code and args, new user_config: in-place reconfigure
        deadline = time.monotonic() + 120
        while requests.get(f"{serve_url}/v1/info", timeout=30).json()["space_run"] != "runB":
            assert time.monotonic() < deadline, "the app never switched to runB"
            time.sleep(0.2)
        switch_s = time.monotonic() - t_switch
        n_before = len(results)
        while len(results) < n_before + 4:  # a few answers after the switch
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    runs = [out["space_run"] for _, out in results]
    assert runs[0] == "runA" and runs[-1] == "runB", runs
    for _, out in results:  # each answer is entirely one space's: its ids AND its scores
        assert_same(out, answers[out["space_run"]])
    info = requests.get(f"{serve_url}/v1/info", timeout=30).json()
    assert (info["space_run"], info["index_size"], info["embed_dim"]) == ("runB", 16, 12)
    assert info["reconfigure_error"] is None
    r = requests.get(f"{serve_url}/v1/models/runB-t3-m0", timeout=30)
    assert r.status_code == 200 and r.json()["space_run"] == "runB"
    print(f"switched in {switch_s:.1f}s; {len(results)} requests during the test, runs: "
          f"{runs.count('runA')} runA, {runs.count('runB')} runB")

    # a bad space keeps the old one serving, and /v1/info says why
    apply_config(app_config(serve_root, "no_such_run"))
    deadline = time.monotonic() + 60
    while (info := requests.get(f"{serve_url}/v1/info", timeout=30).json())["reconfigure_error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert info["space_run"] == "runB" and "no_such_run" in info["reconfigure_error"]
    assert post(serve_url, json=good_body()).json()["space_run"] == "runB"
