"""Bounds on untrusted input, in process (no Ray started): the parsing layer, and the Ingress's FastAPI
app called as ASGI with fake Encoder and Index handles.

Pixel budget and per-image bounds from headers (413, nothing decoded), resize as decoded, the API docs
behind the token, the queue bound (503 + Retry-After, body unread), the timeout (504), /v1/healthz
while a request is being decoded, and the refusal to listen beyond loopback without a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import threading
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from serve.args import AppArgs, ExposureError, check_exposure, is_loopback
from serve.inputs import ApiError, ImageLimits, check_image_headers, decode_image, decode_resized
from serve.timing import parse_server_timing

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token"
SPACE = "/root/spaces/runA"


def png(size=(32, 32), mode="RGB", color=100) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(size, seed=0, fmt="PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Counts every pixel decode (PIL's ImageFile.load): the header checks must leave it at zero."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- the parsing layer ------------------------------------------------------------------------


def test_the_known_bomb_is_refused_from_headers_without_decoding(no_decoding, ledger):
    ledger.bad_input(1)
    one = png((1024, 1024))  # solid colour: ~4 KB, 3 MiB decoded
    raw = [one] * 2000  # 2,000 of them: an 8 MB upload that decodes to 6 GiB
    with pytest.raises(ApiError) as err:
        check_image_headers(raw, ImageLimits())
    assert err.value.status == 413
    msg = err.value.message
    assert "64,000,000 pixels per request" in msg and "max_pixels_per_request" in msg and "2,097,152,000" in msg
    assert "\n" not in msg
    assert no_decoding == []  # not one image decoded
    # the same from base64 strings (a JSON body)
    with pytest.raises(ApiError, match="max_pixels_per_request"):
        check_image_headers([base64.b64encode(one).decode()] * 100, ImageLimits())
    assert no_decoding == []
    # within the budget: the bytes come back, still undecoded
    assert check_image_headers(raw[:61], ImageLimits()) == raw[:61] and no_decoding == []


def test_per_image_bounds_are_checked_from_the_header(no_decoding, ledger):
    ledger.bad_input(1)
    limits = ImageLimits(max_image_side=4096, max_image_pixels=1_000_000, max_pixels_per_request=10**9)
    cases = [
        (png_header_only(1100, 1000), "1,100,000 px", "max_image_pixels"),  # over the pixel bound
        (png_header_only(5000, 10), "5000x10", "4096 px a side"),  # over the side bound
        (png_header_only(30_000, 30_000), "too large to decode"),  # a 2.7 GB bomb: PIL's own guard stops it
    ]
    for data, *texts in cases:
        for call in (lambda d: check_image_headers([png(), d], limits), lambda d: decode_image(d, 1, 4096, 1_000_000)):
            with pytest.raises(ApiError) as err:
                call(data)
            assert err.value.status == 413 and "images[1]" in err.value.message, err.value.message
            assert all(t in err.value.message for t in texts), err.value.message
    assert no_decoding == []
    # only PNG and JPEG parsers are tried; other formats are named
    for data, name in [(noisy_png((8, 8), fmt="GIF"), "GIF"), (noisy_png((8, 8), fmt="BMP"), "BMP"),
                       (noisy_png((8, 8), fmt="TIFF"), "TIFF")]:
        with pytest.raises(ApiError, match=f"is a {name} image; send PNG or JPEG"):
            check_image_headers([data], limits)


def test_images_are_resized_to_the_extractor_size_as_they_are_decoded():
    from serve.deployments import to_model_input

    datas = [noisy_png((32, 32), 1), noisy_png((20, 24), 2), noisy_png((300, 200), 3),
             noisy_png((64, 64), 4, fmt="JPEG"), png((32, 32), "L", 7), png((40, 40), "RGBA", 9)]
    limits = ImageLimits()
    assert check_image_headers(datas, limits) == datas
    out, resized = decode_resized(datas, 32, limits)
    assert out.shape == (6, 3, 32, 32) and out.dtype == np.uint8 and resized == 4
    originals = [decode_image(d, i, 1024) for i, d in enumerate(datas)]
    # already at the extractor size: the very pixels decoded (as the Encoder gets them today)
    assert np.array_equal(out[0], originals[0]) and np.array_equal(out[4], originals[4])
    # the others: exactly what the Encoder's resize (to_model_input) made of the full-size image before
    before, n_before = to_model_input(originals, 32)
    assert n_before == 4 and torch.equal(torch.from_numpy(out), before)
    # and the Encoder leaves the resized batch alone
    again, n_again = to_model_input(out, 32)
    assert n_again == 0 and torch.equal(again, before)


def test_a_cancelled_request_stops_decoding_between_images(no_decoding):
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(ApiError) as err:
        decode_resized([png()] * 3, 32, ImageLimits(), cancelled)
    assert err.value.status == 504 and no_decoding == []


def test_dataset_sample_over_the_pixel_budget_is_refused_before_decoding(tmp_path, monkeypatch, ledger):
    ledger.bad_input(1)
    from serve.inputs import dataset_query
    from serve.toy import make_toy_task
    from tans.storage import Storage

    make_toy_task(str(tmp_path), "toytask", n_classes=3, per_class=6, size=24)
    decoded = []
    monkeypatch.setattr("tans.data.reader.decode_images", lambda *a, **k: decoded.append(a) or None)
    with pytest.raises(ApiError) as err:
        dataset_query(Storage(str(tmp_path)), "toytask", "train", 3, 0, 64, 512, max_pixels=9 * 24 * 24 - 1)
    assert err.value.status == 413 and "max_pixels_per_request" in err.value.message and decoded == []


# --- exposure ---------------------------------------------------------------------------------


def test_exposure_check():
    for host in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org", "", "192.168.1.2"):
        assert not is_loopback(host), host
    check_exposure("127.0.0.1", has_token=False, behind_auth_proxy=False)
    check_exposure(None, has_token=False, behind_auth_proxy=False)  # no HTTP proxy at all
    check_exposure("0.0.0.0", has_token=True, behind_auth_proxy=False)
    check_exposure("0.0.0.0", has_token=False, behind_auth_proxy=True)
    with pytest.raises(ExposureError) as err:
        check_exposure("0.0.0.0", has_token=False, behind_auth_proxy=False)
    msg = str(err.value)
    assert "\n" not in msg and "0.0.0.0" in msg and "TANS_SERVE_TOKEN" in msg and "behind_auth_proxy" in msg


def test_build_app_refuses_a_public_address_without_token_unless_behind_a_proxy(monkeypatch, capsys, ledger):
    ledger.bad_input(1)
    import serve.app
    from jobs._common import run_main
    from serve.app import build_app

    monkeypatch.delenv("TANS_TEST_TOKEN_ENV", raising=False)
    args = AppArgs(auth_token_env="TANS_TEST_TOKEN_ENV")
    assert serve.app.serving_host() == "127.0.0.1"  # no Serve running: the address serve.run would use
    build_app(args)  # loopback: fine without a token
    monkeypatch.setattr(serve.app, "serving_host", lambda: "0.0.0.0")
    with pytest.raises(ExposureError, match="refusing to serve on 0.0.0.0"):
        build_app(args)
    # what `tans serve --host 0.0.0.0` does with it: one line on stderr, exit 2 (a config error)
    assert run_main(lambda argv: build_app(args), []) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: refusing to serve on 0.0.0.0")
    build_app(AppArgs(auth_token_env="TANS_TEST_TOKEN_ENV", behind_auth_proxy=True))
    monkeypatch.setenv("TANS_TEST_TOKEN_ENV", TOKEN)
    build_app(args)


def test_apply_config_turns_a_refused_build_into_one_line(monkeypatch):
    import serve.deploy

    message = ("Deploying application tans failed: Traceback (most recent call last):\n  File ...\n"
               "serve.args.ExposureError: refusing to serve on 0.0.0.0 (not a loopback address) without a token\n")
    with pytest.raises(ExposureError) as err:
        serve.deploy.raise_deploy_failure([message])
    assert str(err.value) == "refusing to serve on 0.0.0.0 (not a loopback address) without a token"
    with pytest.raises(RuntimeError, match="deploy failed"):
        serve.deploy.raise_deploy_failure(["something else\nbroke"])


# --- the Ingress app in process -----------------------------------------------------------------


class _Remote:
    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    async def remote(self, *args):
        self.calls.append(args)
        out = self.fn(*args)
        return await out if asyncio.iscoroutine(out) else out


class FakeEncoder:
    def __init__(self, size=32):
        self.image_size = _Remote(lambda pin=None: {"space_uri": SPACE, "image_size": size})
        self.encode = _Remote(lambda images, labels, pin: {"space_uri": SPACE, "space_run": "runA",
                                                           "embedding": np.zeros(4, np.float32), "resized": 0})
        self.current_uri = _Remote(lambda: SPACE)


class FakeIndex:
    def __init__(self):
        self.search = _Remote(lambda *a: {"space_uri": SPACE, "space_run": "runA", "candidates": [],
                                          "requested_k": 5, "returned_k": 0, "note": "", "constraints": {}})
        self.info = _Remote(lambda: {"space_run": "runA"})
        self.model = _Remote(lambda model_id, embedding: {"space_run": "runA", "model": {"model_id": model_id}})
        self.current_uri = _Remote(lambda: SPACE)


@pytest.fixture
def ingress(monkeypatch):
    """make(**AppArgs fields, token=None) -> (ingress object, encoder, index); the app routes to the latest one."""
    import ray.serve
    from PIL import PngImagePlugin

    from serve.app import Ingress

    made = {}
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", PngImagePlugin.MAX_TEXT_MEMORY)  # the Ingress lowers it
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=made["obj"]))
    cls = Ingress.func_or_class.__mro__[1]  # the class as written, without Serve's replica wrapper

    def patch(name: str, value) -> None:
        """Replace a name the Ingress's methods use (Serve gives the class a copy of the module's globals)."""
        monkeypatch.setitem(cls._query.__globals__, name, value)

    def make(token: str | None = None, **fields):
        encoder, index = FakeEncoder(), FakeIndex()
        obj = cls.__new__(cls)
        cls.__init__(obj, encoder, index, AppArgs(auth_token_env="TANS_TEST_UNSET_TOKEN_ENV", **fields),
                     hashlib.sha256(token.encode()).hexdigest() if token else None)
        made["obj"] = obj
        return obj, encoder, index

    make.patch = patch
    return make


def served_app():
    """The FastAPI app as a replica serves it: Serve's frozen copy, whose methods see only the module globals
    that existed when the class was decorated (a name defined later is a NameError there, not here)."""
    from serve.app import Ingress

    wrapper_init = Ingress.func_or_class.__init__
    cells = dict(zip(wrapper_init.__code__.co_freevars, wrapper_init.__closure__))
    return cells["frozen_app_or_func"].cell_contents


class Call:
    """One HTTP request to the ASGI app, with a body that may arrive late (``gate``)."""

    def __init__(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                 gate: asyncio.Event | None = None):
        self.method, self.path, self.body, self.gate = method, path, body, gate
        self.headers = {"content-type": "application/json", **(headers or {})}
        self.body_read = False
        self.messages: list[dict] = []

    async def run(self):
        api = served_app()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
                 "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "root_path": "",
                 "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]}
        sent = False

        async def receive():
            nonlocal sent
            self.body_read = True
            if sent:
                await asyncio.Event().wait()  # the client sends nothing more
            if self.gate is not None:
                await self.gate.wait()
            sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}

        async def send(message):
            self.messages.append(message)

        await api(scope, receive, send)
        return self

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    def header(self, name: str) -> str | None:
        return dict(self.messages[0]["headers"]).get(name.lower().encode(), b"").decode() or None

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self):
        return json.loads(self.content)


def request(*args, **kw) -> Call:
    return asyncio.run(Call(*args, **kw).run())


def json_body(images: list[bytes], labels=None) -> bytes:
    labels = labels if labels is not None else [i % 2 for i in range(len(images))]
    return json.dumps({"images": [base64.b64encode(d).decode() for d in images], "labels": labels}).encode()


def test_http_bomb_gets_413_without_decoding_and_no_model_call(ingress, no_decoding, ledger):
    ledger.bad_input(1)
    _, encoder, index = ingress()
    calls = []
    ingress.patch("decode_resized", lambda *a: calls.append(a))
    body = json_body([png((1024, 1024))] * 2000)
    assert len(body) < AppArgs().max_body_bytes  # ~14 MB of JSON: a legal body
    r = request("POST", "/v1/retrieve", body)
    assert r.status == 413 and "64,000,000 pixels per request" in r.json()["error"], r.content
    assert list(r.json()) == ["error"] and no_decoding == [] and calls == []
    assert encoder.image_size.calls == encoder.encode.calls == index.search.calls == []


def test_http_query_is_decoded_resized_and_sent_as_one_batch(ingress):
    _, encoder, _ = ingress()
    images = [noisy_png((32, 32), i) for i in range(4)] + [noisy_png((50, 40), 9), png((20, 20), "L")]
    r = request("POST", "/v1/retrieve", json_body(images, [0, 1, 0, 1, 2, 2]))
    assert r.status == 200, r.content
    assert r.json()["resized"] == 2 and r.json()["n_images"] == 6 and r.json()["n_classes"] == 3
    # where the time went: the Ingress's own phases; these fake models report no time of their own
    # (as deployments of an older version), so no encoder/index entries, and no "ms" in the answer
    timing = parse_server_timing(r.header("Server-Timing") or "")
    assert set(timing) == {"read", "decode", "encode", "search", "ingress"} and "ms" not in r.json()
    assert timing["ingress"] >= timing["read"] + timing["decode"] + timing["encode"] + timing["search"] - 0.4
    ((batch, labels, pin),) = encoder.encode.calls
    assert isinstance(batch, np.ndarray) and batch.shape == (6, 3, 32, 32) and batch.dtype == np.uint8
    # not pinned to the space whose size it asked: the Encoder's current one encodes it (and
    # resizes again, should a switch have changed the size since)
    assert pin is None and labels.tolist() == [0, 1, 0, 1, 2, 2]
    assert np.array_equal(batch[0], decode_image(images[0], 0, 1024))
    # a per-image bomb over HTTP: 413, the models never called
    r = request("POST", "/v1/retrieve", json_body([png(), png_header_only(30_000, 30_000)]))
    assert r.status == 413 and "images[1]" in r.json()["error"] and len(encoder.encode.calls) == 1
    # the image size is asked once, not on every request (it is reused for TARGET_TTL_S)
    for _ in range(3):
        assert request("POST", "/v1/retrieve", json_body(images[:4], [0, 1, 0, 1])).status == 200
    assert len(encoder.image_size.calls) == 1 and len(encoder.encode.calls) == 4


def test_png_metadata_is_bounded_in_the_ingress(ingress, no_decoding, ledger):
    """PNG text chunks are inflated while the header is read: the Ingress allows 4 MiB of them an image."""
    ledger.bad_input(1)
    ingress()
    one_mib = zlib.compress(b"\0" * (1024 * 1024 - 1))  # 1 KB that inflates to just under PIL's 1 MiB a chunk
    head, tail = png()[:33], png()[33:]  # signature + IHDR, then the rest

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    fat = head + b"".join(chunk(b"zTXt", b"k%d\0\0" % i + one_mib) for i in range(6)) + tail
    assert len(fat) < 10_000
    r = request("POST", "/v1/retrieve", json_body([png(), fat]))
    assert r.status == 413 and "images[1] holds too much metadata" in r.json()["error"], r.content
    assert no_decoding == []


def test_docs_and_openapi_need_the_token_when_there_is_one(ingress, ledger):
    ledger.bad_input(1)
    ingress(token=TOKEN)
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/info"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = request("GET", path, headers=headers)
            assert r.status == 401 and "token" in r.json()["error"] and r.header("www-authenticate") == "Bearer", path
    ok = {"Authorization": f"Bearer {TOKEN}"}
    spec = request("GET", "/openapi.json", headers=ok)
    assert spec.status == 200 and "/v1/retrieve" in spec.json()["paths"]
    assert "/docs" not in spec.json()["paths"]
    for path in ("/docs", "/redoc"):
        r = request("GET", path, headers=ok)
        assert r.status == 200 and b"/openapi.json" in r.content and r.header("content-type").startswith("text/html")
    assert request("GET", "/v1/healthz").status == 200  # probes need no token
    # no token configured: all open
    ingress()
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/info"):
        assert request("GET", path).status == 200, path


def test_a_full_replica_answers_503_with_retry_after_before_reading_the_body(ingress, ledger):
    ledger.bad_input(1)
    obj, _, _ = ingress(max_queued_requests=2)

    async def scenario():
        gate = asyncio.Event()
        slow = [asyncio.create_task(Call("POST", "/v1/retrieve", json_body([png(), png()]), gate=gate).run())
                for _ in range(2)]
        while obj.in_flight < 2:
            await asyncio.sleep(0.001)
        third = await Call("POST", "/v1/retrieve", json_body([png(), png()])).run()
        health = await Call("GET", "/v1/healthz").run()  # not counted
        gate.set()
        return third, health, await asyncio.gather(*slow)

    third, health, slow = asyncio.run(scenario())
    assert third.status == 503 and third.header("retry-after") == "1" and not third.body_read
    assert "max_queued_requests" in third.json()["error"]
    assert health.status == 200
    assert [c.status for c in slow] == [200, 200] and obj.in_flight == 0


def test_a_slow_request_gets_504_and_frees_its_slot(ingress, ledger):
    ledger.bad_input(1)
    obj, encoder, _ = ingress(request_timeout_s=0.2)
    # a client that never finishes its body (slowloris)
    r = request("POST", "/v1/retrieve", gate=asyncio.Event())
    assert r.status == 504 and "request_timeout_s" in r.json()["error"] and obj.in_flight == 0

    # models that do not answer in time
    async def stuck(*args):
        await asyncio.sleep(10)

    encoder.encode.fn = stuck
    r = request("POST", "/v1/retrieve", json_body([png(), png()]))
    assert r.status == 504 and "0.2 s" in r.json()["error"] and obj.in_flight == 0


def test_healthz_answers_while_a_request_is_being_decoded(ingress):
    from serve import inputs

    ingress()
    entered, release = threading.Event(), threading.Event()

    def slow_decode(*args):
        entered.set()
        assert release.wait(30)
        return inputs.decode_resized(*args)

    ingress.patch("decode_resized", slow_decode)

    async def scenario():
        big = asyncio.create_task(Call("POST", "/v1/retrieve", json_body([png(), png()])).run())
        while not entered.is_set():
            assert not big.done(), big.result().content
            await asyncio.sleep(0.001)
        health = await asyncio.wait_for(Call("GET", "/v1/healthz").run(), 5)  # the decoder is blocked meanwhile
        release.set()
        return health, await big

    health, big = asyncio.run(scenario())
    assert health.status == 200 and big.status == 200


def test_tans_serve_on_all_interfaces_without_a_token_is_refused_before_ray_starts(tmp_path, ledger):
    """`tans serve --host 0.0.0.0` with no token: exit 2 and one line, and nothing ever listened."""
    ledger.bad_input(1)
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys\nfrom jobs._common import run_main\nfrom jobs.serve import main\n"
            f"rc = run_main(main, ['--host', '0.0.0.0', '--root', {str(tmp_path)!r}])\n"
            "print('RESULT', rc, 'ray' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "TANS_SERVE_TOKEN"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert [line for line in proc.stdout.splitlines() if line.startswith("RESULT")] == ["RESULT 2 False"], proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: refusing to serve on 0.0.0.0"), proc.stderr
