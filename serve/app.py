"""The online retriever as a Ray Serve application: ``serve run serve/config.yaml`` or ``tans serve``.

Three deployments, composed with ``.bind()``::

    Ingress (FastAPI, HTTP API, limits, auth) --handle--> Encoder (extractor + query encoder, @serve.batch)
                                              --handle--> Index   (constraint mask, ranking, top-k)

or, with ``args.fused``, the Ingress alone, holding an Encoder and an Index object in its own
process (serve/in_process.py gives them the handles' calling convention): no hop between
deployments, at the price of the models in every Ingress replica. The space (and the Encoder's
batching settings) is then the Ingress's ``user_config``, which it hands to both.

The Index ranks as ``tans search`` does: the predictor's score blended with the nearest-dataset
prior (the query's mean feature, from the Encoder, against the zoo tasks' stored queries) at the
request's ``prior_weight`` or the service's; at 0, top-k by cosine and the predictor's re-rank.

One request uses one space end to end: the Encoder answers with the space URI it used; the
Index is asked for that same URI. Both keep the previous space loaded after a ``reconfigure``
(serve/spaces.py), so during a switch a request made with the old space is finished by the old
index. If one side does not hold the other's space (a replica that started after the switch),
the ingress asks the Encoder again pinned to the Index's space, retrying briefly until both hold
it (``switch_timeout_s``, then 503). Every response names the space run that answered it.

Untrusted input is bounded in the ingress (the numbers are AppArgs' defaults, serve/args.py):

* a replica holds at most ``max_queued_requests`` (32) API requests at once; one more is
  answered 503 with ``Retry-After`` before its body is read, so a flood costs no parsing;
* each request has ``request_timeout_s`` (60 s) from arrival to answer, else 504;
* the body is at most ``max_body_mb`` (32 MB), at most ``max_images`` (2,000) images, each at
  most ``max_image_side`` (1,024) px a side and ``max_image_pixels`` (1 M) px, and the images'
  width x height summed at most ``max_pixels_per_request`` (64 M): all checked from the headers
  before any pixel is decoded (413), and each image is resized to the extractor's size as it is
  decoded (serve/inputs.py), so decoded memory is ``n_images x 3 x side^2`` of the extractor;
* body parsing and image decoding run in worker threads, so the event loop (and /v1/healthz)
  keeps answering while a big request is parsed;
* with a token, every route but ``/v1/healthz`` needs it, the API docs (``/docs``, ``/redoc``,
  ``/openapi.json``) included;
* ``build_app`` refuses (:class:`serve.args.ExposureError`, a one-line error) to build the app
  when Serve listens on a non-loopback address with no token, unless ``behind_auth_proxy``.

No ``from __future__ import annotations`` here: Serve reads ``app_builder``'s annotation (a
pydantic model) to validate the config's ``args``, and FastAPI reads the route signatures.
"""

import asyncio
import hashlib
import hmac
import os
import threading
import time
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.args import RETRY_AFTER_S, AppArgs, check_exposure
from serve.deployments import Encoder, Index, SpaceConfig
from serve.in_process import InProcessHandle
from serve.inputs import (
    ApiError,
    ErrorBody,
    ImageLimits,
    Query,
    RetrieveRequest,
    RetrieveResponse,
    check_count,
    check_image_headers,
    check_labels,
    dataset_query,
    decode_resized,
    parse_json_request,
    parse_multipart_request,
)
from serve.spaces import SpaceSwitchTimeout, with_one_space
from serve.timing import HEADER as SERVER_TIMING
from serve.timing import ServerTiming

API_DESCRIPTION = """\
Retrieve the best pretrained subnets of a model zoo for a new image dataset (TANS).

Send a query as JSON (base64 PNG/JPEG `images` + `labels`), as `multipart/form-data` (image file
parts named `images` + `labels` as repeated fields or `0,1,1`), or name a `dataset` (a task in the
service's storage root). Images of any mode are accepted: each is converted to RGB and resized to
the space's extractor image size (bilinear, antialiased) as it is decoded; the response counts the
resized ones. Models are ranked as `tans search` ranks them: the predicted accuracy blended with a
nearest-dataset prior, `z(predicted) + prior_weight * z(nearest-dataset score)` (`prior_weight` 0:
the space alone, top-k by cosine, re-ranked when `rerank`). Every error is `{"error": "..."}` with a
4xx or 5xx status.

Limits (the service's settings; defaults in brackets): body `max_body_mb` [32 MB], `max_images` [2000]
a request, `max_image_side` [1024 px] and `max_image_pixels` [1,048,576] an image, and
`max_pixels_per_request` [64,000,000]: the images' width x height summed, read from their headers
before any is decoded (413 over any of them); `request_timeout_s` [60 s] from arrival to answer (504);
`max_queued_requests` [32] requests held at once by one ingress replica (503 with `Retry-After` beyond).

When the service has a token (environment variable `TANS_SERVE_TOKEN` by default), every route
except `/v1/healthz` needs `Authorization: Bearer <token>`, these docs and `/openapi.json` included.
"""

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody, "description": text} for code, text in [
    (400, "malformed request (says which field)"), (401, "missing or wrong bearer token"),
    (404, "unknown model or dataset"),
    (413, "too many images, or body, image or the request's decoded pixels over their limit"),
    (422, "no model satisfies the constraints (names the smallest model)"),
    (503, "the replica holds max_queued_requests already (see Retry-After), or it is switching spaces; retry"),
    (504, "the request took more than request_timeout_s")]}

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "string", "description": "repeated fields, or '0,1,1', or '[0,1,1]'"},
        **{name: {"type": "integer"} for name in ("k", "max_params", "max_flops", "per_class", "seed")},
        "family": {"type": "string"}, "dataset": {"type": "string"}, "rerank": {"type": "boolean"},
        "prior_weight": {"type": "number"},
    },
}

# The docs routes are the Ingress's own (below), so that they need the token when there is one.
api = FastAPI(title="TANS retrieval", version="1", description=API_DESCRIPTION, docs_url=None, redoc_url=None,
              openapi_url=None)
bearer = HTTPBearer(auto_error=False, description="the token in the service's auth_token_env variable")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _error(exc.status, exc.message, headers or None)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
    return _error(400, "; ".join(parts) or "invalid request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return _error(500, f"internal error ({type(exc).__name__}); the service is still up")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _root_path(request: Request) -> str:
    """The route prefix the app is served under ("" at /). Defined before the Ingress: Serve ships the
    class with a copy of the globals it references, taken when the class is decorated."""
    return request.scope.get("root_path", "").rstrip("/")


def serving_host() -> str | None:
    """The address Serve's HTTP proxies listen on (None: no proxy), read from the running Serve.

    With no Serve running in this process's Ray (or no Ray), the address a ``serve.run`` would
    start it on: Serve's default (127.0.0.1, or ``$RAY_SERVE_DEFAULT_HTTP_HOST``). A config file
    deployed with ``serve run``/``serve deploy``/KubeRay starts Serve first (on the config's
    ``http_options.host``, default 0.0.0.0), so the builder reads that one.
    """
    import ray
    from ray.serve.config import HTTPOptions

    if ray.is_initialized():
        from ray.serve.context import _get_global_client

        try:
            client = _get_global_client(raise_if_no_controller_running=False)
        except Exception as exc:  # fail closed: an unknown address is not loopback
            return f"<unknown address: {type(exc).__name__}>"
        if client is not None:
            return client.http_config.host
    return HTTPOptions().host


def _deployment(decorated: object) -> serve.Deployment:
    """A ``@serve.deployment`` class as what it is at run time (a type checker keeps its class type).
    Defined before the Ingress, which uses it (see :func:`_root_path`)."""
    if not isinstance(decorated, serve.Deployment):
        raise TypeError(f"{decorated!r} is not a Serve deployment")
    return decorated


def _fused_parts(args: AppArgs) -> tuple[Any, ...]:
    """The fused app's Encoder and Index, as plain objects of their deployments' classes."""
    parts = []
    for decorated in (Encoder, Index):
        cls = _deployment(decorated).func_or_class
        if not isinstance(cls, type):
            raise TypeError(f"{cls!r} is not a class")
        parts.append(cls(args))
    return tuple(parts)


# How long the Ingress reuses the Encoder's answer to "at which image size?".
TARGET_TTL_S = 2.0


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=128,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
)
@serve.ingress(api)
class Ingress:
    """HTTP API: parses and limits requests, pins one space per request across Encoder and Index."""

    def __init__(self, encoder: DeploymentHandle | None, index: DeploymentHandle | None, args: AppArgs,
                 token_sha256: str | None = None):
        import torch
        from PIL import PngImagePlugin

        from tans.storage import Storage

        torch.set_num_threads(1)
        # PNG text and ICC chunks are decompressed while the header is read: at most 4 MiB an image
        # here (PIL's default is 64 MiB), so header checks of 2,000 images stay cheap.
        PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 4 * 1024 * 1024)
        self.args = args
        # fused: the Encoder and Index objects live here; their spaces arrive through reconfigure()
        self.parts = _fused_parts(args) if args.fused else ()
        self.encoder: Any = InProcessHandle(self.parts[0]) if self.parts else encoder
        self.index: Any = InProcessHandle(self.parts[1]) if self.parts else index
        self.storage = Storage(args.root)
        own = os.environ.get(args.auth_token_env, "")
        # The builder hands over only a hash of the token, so no secret sits in the deployment's args.
        self.token_sha256 = token_sha256 or (hashlib.sha256(own.encode()).hexdigest() if own else None)
        self.limits = ImageLimits(args.max_image_side, args.max_image_pixels, args.max_pixels_per_request)
        self.in_flight = 0  # API requests this replica holds now (one event loop: no lock needed)
        self._image_size: int | None = None  # the Encoder's current space's, and when it was asked
        self._image_size_at = 0.0

    async def reconfigure(self, user_config: dict) -> None:
        """The fused app's user_config (the Encoder's: space and batching) to its Encoder and Index.

        Serve calls this only when the Ingress has a user_config; in the split layout the space is
        the Encoder's and the Index's user_config, so one here would be silently ignored: refused.
        """
        if not self.parts:
            raise ValueError("the Ingress takes a user_config only with args.fused: true; otherwise set the space "
                             "in the Encoder's and the Index's user_config")
        encoder, index = self.parts
        await encoder.reconfigure(user_config)
        space = SpaceConfig.model_fields["space"].default if user_config is None else user_config.get("space")
        await index.reconfigure({"space": space} if space is not None else {})

    def check_health(self) -> None:
        for part in self.parts:  # fused: no space loaded is not healthy (split: the deployments check)
            part.check_health()

    async def _resize_image_size(self) -> int:
        """The image size of the Encoder's current space, asked at most every TARGET_TTL_S.

        Asking on every request was one more round trip to the Encoder per request. The request
        is not pinned to the space that answered: it goes to the Encoder's current space, which
        resizes again any images made for another size (``resized``), so a stale size during a
        space switch costs a resize, never a wrong answer or a request held on the old space.
        """
        now = time.monotonic()
        if self._image_size is None or now - self._image_size_at > TARGET_TTL_S:
            self._image_size = int((await self.encoder.image_size.remote())["image_size"])
            self._image_size_at = now
        return self._image_size

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token_sha256 is None:
            return
        given = hashlib.sha256(credentials.credentials.encode()).hexdigest() if credentials else ""
        if not hmac.compare_digest(given, self.token_sha256):
            raise ApiError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")

    async def _bounded(self, work):
        """``await work(cancelled)`` counted against ``max_queued_requests`` (503) within ``request_timeout_s`` (504).

        ``cancelled`` (a threading.Event) is set when the request ends for any reason, so work in
        a worker thread (image decoding) stops between two images instead of running on unseen.
        """
        args = self.args
        if self.in_flight >= args.max_queued_requests:
            raise ApiError(503, f"this replica already holds {self.in_flight} requests (max_queued_requests); "
                                f"retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        cancelled = threading.Event()
        try:
            async with asyncio.timeout(args.request_timeout_s) as deadline:
                return await work(cancelled)
        except TimeoutError:
            if deadline.expired():
                raise ApiError(504, f"the request took more than {args.request_timeout_s:g} s "
                                    "(request_timeout_s)") from None
            raise
        finally:
            cancelled.set()
            self.in_flight -= 1

    async def _query(self, request: Request, cancelled: threading.Event,
                     timing: ServerTiming) -> tuple[RetrieveRequest, Query, int]:
        """(request, query, images the ingress resized): body read, parsed and decoded off the event loop."""
        args = self.args
        with timing.phase("read"):  # the upload arriving from the proxy
            body = await read_body(request, args.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        files = None
        if content_type.lower().startswith("multipart/form-data"):
            req, files = await asyncio.to_thread(parse_multipart_request, body, content_type)
            if req.images is not None:
                raise ApiError(400, "images: in a multipart request send images as file parts, not a field")
        else:
            req = await asyncio.to_thread(parse_json_request, body)
        del body
        if req.k > args.max_k:
            raise ApiError(400, f"k: {req.k} is more than this service's max_k of {args.max_k}")
        has_images = bool(files) or req.images is not None
        if has_images and req.dataset is not None:
            raise ApiError(400, "send images (with labels) or a dataset, not both")
        if req.dataset is not None:
            if req.labels is not None:
                raise ApiError(400, "labels: a dataset brings its own labels; send no labels with it")
            per_class = req.per_class or args.per_class
            if per_class > args.max_per_class:
                raise ApiError(400, f"per_class: {per_class} is more than this service's max of {args.max_per_class}")
            query = await asyncio.to_thread(dataset_query, self.storage, req.dataset, req.split, per_class,
                                            req.seed, args.max_images, args.max_image_side,
                                            args.max_pixels_per_request)
            return req, query, 0
        if not has_images:
            raise ApiError(400, "images (with labels) or dataset: one of them is required")
        raw = files if files is not None else req.images
        if raw is None:  # cannot happen: has_images
            raise ApiError(400, "images (with labels) or dataset: one of them is required")
        check_count(len(raw), args.max_images)
        labels = check_labels(req.labels, len(raw))
        # 1. headers only: formats, sizes and the pixel budget, before any pixel is decoded
        datas = await asyncio.to_thread(check_image_headers, raw, self.limits, cancelled)
        del raw, files
        req.images = None
        # 2. decode each image and resize it at once to the size of the space that will encode it
        image_size = await self._resize_image_size()
        images, resized = await asyncio.to_thread(decode_resized, datas, image_size, self.limits,
                                                  cancelled)
        return req, Query(images=images, labels=labels), resized

    async def _answer(self, req: RetrieveRequest, query: Query, resized: int, timing: ServerTiming) -> dict:
        """Encode and search with one space (serve/spaces.py:with_one_space)."""

        async def encode(pin):
            with timing.phase("encode"):
                out = await self.encoder.encode.remote(query.images, query.labels, pin)
            timing.add("encoder", out.pop("ms", None))  # absent from an Encoder of an older version
            return out

        async def search(encoded):
            with timing.phase("search"):
                res = await self.index.search.remote(encoded["embedding"], encoded["space_uri"], req.k,
                                                     req.max_params, req.max_flops, req.family, req.rerank,
                                                     # absent from an Encoder of an older version: the space alone
                                                     encoded.get("feature_mean"), req.prior_weight)
            timing.add("index", res.pop("ms", None))
            if "error" in res:
                raise ApiError(res["status"], res["error"])
            return res

        try:
            encoded, searched = await with_one_space(encode, search, self.args.switch_timeout_s)
        except SpaceSwitchTimeout:
            raise ApiError(503, "the service is switching spaces and its parts do not hold the same one yet; "
                                "retry in a few seconds") from None
        # the Encoder resizes again only images made for another space's size (during a switch)
        return {**searched, "n_images": len(query), "n_classes": len(set(query.labels.tolist())),
                "resized": max(resized, encoded["resized"])}

    @api.post(
        "/v1/retrieve",
        response_model=RetrieveResponse,
        responses=ERRORS,
        summary="retrieve models for a dataset",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": RetrieveRequest.model_json_schema()},
                    "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
                },
            }
        },
    )
    async def retrieve(self, request: Request, response: Response,
                       credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Ranked candidates (best first) for the query under the constraints, and the space run that answered.

        The ``Server-Timing`` header of the answer says where its time went (serve/timing.py)."""
        self._authorize(credentials)

        async def work(cancelled):
            timing = ServerTiming()
            t0 = time.perf_counter()
            req, query, resized = await self._query(request, cancelled, timing)
            # decode: parsing, header checks and decoding, i.e. the query's time after its body arrived
            timing.add("decode", (time.perf_counter() - t0) * 1e3 - timing.ms.get("read", 0.0))
            out = await self._answer(req, query, resized, timing)
            response.headers[SERVER_TIMING] = timing.header()
            return out

        return await self._bounded(work)

    @api.get("/v1/models/{model_id}", responses=ERRORS, summary="one zoo row of the current space")
    async def model(self, model_id: str, embedding: bool = False,
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The model's zoo row (architecture, accuracy, n_params, flops, ...); its embedding if ``embedding=true``."""
        self._authorize(credentials)

        async def work(cancelled):
            return await self.index.model.remote(model_id, embedding)

        out = await self._bounded(work)
        if "missing_model" in out:
            raise ApiError(404, f"model {model_id!r} is not in space run {out['space_run']!r}")
        return out

    @api.get("/v1/info", responses=ERRORS, summary="the space being served")
    async def info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Space run and URI, index size, families, extractor, versions (one consistent snapshot)."""
        self._authorize(credentials)

        async def work(cancelled):
            return await self.index.info.remote()

        return await self._bounded(work)

    @api.get("/v1/healthz", summary="liveness: both model deployments answer")
    async def healthz(self) -> dict:
        """No token, not counted against max_queued_requests: a probe is answered while big requests are parsed."""
        try:
            await asyncio.wait_for(asyncio.gather(self.encoder.current_uri.remote(), self.index.current_uri.remote()),
                                   timeout=10)
        except Exception as exc:  # any failure means not healthy
            raise ApiError(503, f"a deployment does not answer ({type(exc).__name__})") from None
        return {"status": "ok"}

    # The API docs, behind the token when there is one (FastAPI's own docs routes are switched off).
    # With a token, a browser needs a proxy that adds the header; `curl -H 'Authorization: Bearer ...'
    # <url>/openapi.json` gets the schema.

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JSONResponse:
        self._authorize(credentials)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> HTMLResponse:
        self._authorize(credentials)
        return get_swagger_ui_html(openapi_url=_root_path(request) + "/openapi.json", title=f"{api.title} - docs")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> HTMLResponse:
        self._authorize(credentials)
        return get_redoc_html(openapi_url=_root_path(request) + "/openapi.json", title=f"{api.title} - ReDoc")


def build_app(args: AppArgs, deployment_options: dict | None = None):
    """The application for ``args``: Encoder and Index (space from their user_config) behind the Ingress.

    ``deployment_options`` (``{"Encoder": {...}, "Index": {...}, "Ingress": {...}}``, keyword
    arguments of ``Deployment.options``) is the Python twin of the config file's ``deployments:``
    section: fixed replicas for a benchmark, smaller CPU shares for tests.

    Raises :class:`serve.args.ExposureError` (one line; ``tans serve`` exits 2 with it) when
    Serve listens on a non-loopback address (:func:`serving_host`) and the token variable is
    empty, unless ``args.behind_auth_proxy``.
    """
    token = os.environ.get(args.auth_token_env, "")
    check_exposure(serving_host(), bool(token), args.behind_auth_proxy)
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else None
    opts = {name: dict((deployment_options or {}).get(name, {})) for name in ("Encoder", "Index", "Ingress")}
    if args.fused:
        if opts["Encoder"] or opts["Index"]:
            raise ValueError("fused: the app has no Encoder or Index deployment; set the Ingress's options")
        opts["Ingress"].setdefault("user_config", {"space": args.space})
        # the Encoder's CPU share: its forward passes now run in the Ingress
        opts["Ingress"].setdefault("ray_actor_options", {"num_cpus": 1})
        return _deployment(Ingress).options(**opts["Ingress"]).bind(None, None, args, token_sha256)
    for name in ("Encoder", "Index"):
        opts[name].setdefault("user_config", {"space": args.space})
    encoder = _deployment(Encoder).options(**opts["Encoder"]).bind(args)
    index = _deployment(Index).options(**opts["Index"]).bind(args)
    return _deployment(Ingress).options(**opts["Ingress"]).bind(encoder, index, args, token_sha256)


def app_builder(args: AppArgs):
    """Serve's entry point (``import_path: serve.app:app_builder``): the config's ``args`` as AppArgs."""
    return build_app(args)
