"""The online retriever as a Ray Serve application: ``serve run serve/config.yaml`` or ``tans serve``.

Three deployments, composed with ``.bind()``::

    Ingress (FastAPI, HTTP API, limits, auth) --handle--> Encoder (extractor + query encoder, @serve.batch)
                                              --handle--> Index   (constraint mask, top-k, predictor re-rank)

One request uses one space end to end: the Encoder answers with the space URI it used; the
Index is asked for that same URI. Both keep the previous space loaded after a ``reconfigure``
(serve/spaces.py), so during a switch a request made with the old space is finished by the old
index. If one side does not hold the other's space (a replica that started after the switch),
the ingress asks the Encoder again pinned to the Index's space, retrying briefly until both hold
it (``switch_timeout_s``, then 503). Every response names the space run that answered it.

No ``from __future__ import annotations`` here: Serve reads ``app_builder``'s annotation (a
pydantic model) to validate the config's ``args``, and FastAPI reads the route signatures.
"""

import asyncio
import hashlib
import hmac
import os

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.args import AppArgs
from serve.deployments import Encoder, Index
from serve.inputs import (
    ApiError,
    ErrorBody,
    Query,
    RetrieveRequest,
    RetrieveResponse,
    check_count,
    check_labels,
    dataset_query,
    decode_base64,
    decode_image,
    parse_json_request,
    parse_multipart_request,
    stack_if_uniform,
)
from serve.spaces import SpaceSwitchTimeout, with_one_space

API_DESCRIPTION = """\
Retrieve the best pretrained subnets of a model zoo for a new image dataset (TANS).

Send a query as JSON (base64 PNG/JPEG `images` + `labels`), as `multipart/form-data` (image file
parts named `images` + `labels` as repeated fields or `0,1,1`), or name a `dataset` (a task in the
service's storage root). Images of any size and mode are accepted: each is converted to RGB and
resized to the space's extractor image size (bilinear, antialiased); the response counts the
resized ones. Every error is `{"error": "..."}` with a 4xx status. When the service has a token
(environment variable `TANS_SERVE_TOKEN` by default), every `/v1` route except `/v1/healthz` needs
`Authorization: Bearer <token>`.
"""

ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in [
    (400, "malformed request (says which field)"), (401, "missing or wrong bearer token"),
    (404, "unknown model or dataset"), (413, "too many images, body or image too large"),
    (422, "no model satisfies the constraints (names the smallest model)"),
    (503, "the service is switching spaces; retry")]}

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "string", "description": "repeated fields, or '0,1,1', or '[0,1,1]'"},
        **{name: {"type": "integer"} for name in ("k", "max_params", "max_flops", "per_class", "seed")},
        "family": {"type": "string"}, "dataset": {"type": "string"}, "rerank": {"type": "boolean"},
    },
}

api = FastAPI(title="TANS retrieval", version="1", description=API_DESCRIPTION)
bearer = HTTPBearer(auto_error=False, description="the token in the service's auth_token_env variable")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.message, headers)


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


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=128,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
)
@serve.ingress(api)
class Ingress:
    """HTTP API: parses and limits requests, pins one space per request across Encoder and Index."""

    def __init__(self, encoder: DeploymentHandle, index: DeploymentHandle, args: AppArgs,
                 token_sha256: str | None = None):
        import torch

        from tans.storage import Storage

        torch.set_num_threads(1)
        self.encoder, self.index, self.args = encoder, index, args
        self.storage = Storage(args.root)
        own = os.environ.get(args.auth_token_env, "")
        # The builder hands over only a hash of the token, so no secret sits in the deployment's args.
        self.token_sha256 = token_sha256 or (hashlib.sha256(own.encode()).hexdigest() if own else None)

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token_sha256 is None:
            return
        given = hashlib.sha256(credentials.credentials.encode()).hexdigest() if credentials else ""
        if not hmac.compare_digest(given, self.token_sha256):
            raise ApiError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")

    async def _query(self, request: Request) -> tuple[RetrieveRequest, Query]:
        args = self.args
        body = await read_body(request, args.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        files = None
        if content_type.lower().startswith("multipart/form-data"):
            req, files = parse_multipart_request(body, content_type)
            if req.images is not None:
                raise ApiError(400, "images: in a multipart request send images as file parts, not a field")
        else:
            req = parse_json_request(body)
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
                                            req.seed, args.max_images, args.max_image_side)
            return req, query
        if not has_images:
            raise ApiError(400, "images (with labels) or dataset: one of them is required")
        raw = files if files is not None else req.images
        check_count(len(raw), args.max_images)
        labels = check_labels(req.labels, len(raw))

        def decode() -> list:
            out = []
            for i, item in enumerate(raw):
                data = item if isinstance(item, bytes) else decode_base64(item, i)
                out.append(decode_image(data, i, args.max_image_side))
            return stack_if_uniform(out)

        return req, Query(images=await asyncio.to_thread(decode), labels=labels)

    async def _answer(self, req: RetrieveRequest, query: Query) -> dict:
        """Encode and search with one space (serve/spaces.py:with_one_space)."""

        async def encode(pin):
            return await self.encoder.encode.remote(query.images, query.labels, pin)

        async def search(encoded):
            res = await self.index.search.remote(encoded["embedding"], encoded["space_uri"], req.k, req.max_params,
                                                 req.max_flops, req.family, req.rerank)
            if "error" in res:
                raise ApiError(res["status"], res["error"])
            return res

        try:
            encoded, searched = await with_one_space(encode, search, self.args.switch_timeout_s)
        except SpaceSwitchTimeout:
            raise ApiError(503, "the service is switching spaces and its parts do not hold the same one yet; "
                                "retry in a few seconds") from None
        return {**searched, "n_images": len(query), "n_classes": len(set(query.labels.tolist())),
                "resized": encoded["resized"]}

    @api.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS, summary="retrieve models for a dataset",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": RetrieveRequest.model_json_schema()},
                  "multipart/form-data": {"schema": _MULTIPART_SCHEMA}}}})
    async def retrieve(self, request: Request,
                       credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Ranked candidates (best first) for the query under the constraints, and the space run that answered."""
        self._authorize(credentials)
        req, query = await self._query(request)
        return await self._answer(req, query)

    @api.get("/v1/models/{model_id}", responses=ERRORS, summary="one zoo row of the current space")
    async def model(self, model_id: str, embedding: bool = False,
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The model's zoo row (architecture, accuracy, n_params, flops, ...); its embedding if ``embedding=true``."""
        self._authorize(credentials)
        out = await self.index.model.remote(model_id, embedding)
        if "missing_model" in out:
            raise ApiError(404, f"model {model_id!r} is not in space run {out['space_run']!r}")
        return out

    @api.get("/v1/info", responses=ERRORS, summary="the space being served")
    async def info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Space run and URI, index size, families, extractor, versions (one consistent snapshot)."""
        self._authorize(credentials)
        return await self.index.info.remote()

    @api.get("/v1/healthz", summary="liveness: both model deployments answer")
    async def healthz(self) -> dict:
        try:
            await asyncio.wait_for(asyncio.gather(self.encoder.current_uri.remote(), self.index.current_uri.remote()),
                                   timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            raise ApiError(503, f"a deployment does not answer ({type(exc).__name__})") from None
        return {"status": "ok"}


def build_app(args: AppArgs, deployment_options: dict | None = None):
    """The application for ``args``: Encoder and Index (space from their user_config) behind the Ingress.

    ``deployment_options`` (``{"Encoder": {...}, "Index": {...}, "Ingress": {...}}``, keyword
    arguments of ``Deployment.options``) is the Python twin of the config file's ``deployments:``
    section: fixed replicas for a benchmark, smaller CPU shares for tests.
    """
    token = os.environ.get(args.auth_token_env, "")
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else None
    opts = {name: dict((deployment_options or {}).get(name, {})) for name in ("Encoder", "Index", "Ingress")}
    for name in ("Encoder", "Index"):
        opts[name].setdefault("user_config", {"space": args.space})
    encoder = Encoder.options(**opts["Encoder"]).bind(args)
    index = Index.options(**opts["Index"]).bind(args)
    return Ingress.options(**opts["Ingress"]).bind(encoder, index, args, token_sha256)


def app_builder(args: AppArgs):
    """Serve's entry point (``import_path: serve.app:app_builder``): the config's ``args`` as AppArgs."""
    return build_app(args)
