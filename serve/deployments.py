"""The two space-dependent Serve deployments: the Encoder (images -> query embedding) and the Index.

Both take the space from their ``user_config`` (``{"space": ...}``) in ``reconfigure``, which
loads the new space beside the old one and then swaps references (serve/spaces.py). Every answer
names the space URI it was made with, and both accept a ``pin`` URI, so the ingress can make one
request use one space end to end (serve/app.py).

The Encoder batches *images*, not requests: a request's images are cut into chunks of at most
``max_batch_images``, the chunks of concurrent requests are queued into ``@serve.batch`` whose
size counts images (``batch_size_fn``), and each batch is one extractor forward pass. A request
that finds no other request in the Encoder skips the queue: with nothing to batch it with, the
queue's wait (``batch_wait_timeout_s``) would only add to its latency. Forward passes, batched
or not, run one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve.args import AppArgs
from serve.inputs import resize_uint8
from serve.spaces import EncoderSpace, SpaceVersions, load_encoder_space, load_index_space, resolve_space_uri

logger = logging.getLogger("ray.serve")


class _ImageCountBatchWarning(logging.Filter):
    """Drops Serve's "max_batch_size > max_ongoing_requests" warning: our batch size counts images,
    not requests (batch_size_fn), so comparing it with a request count means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is larger than `max_ongoing_requests`" not in record.getMessage()


class SpaceConfig(BaseModel):
    """The Index's user_config."""

    model_config = ConfigDict(extra="forbid")
    space: str = "LATEST"


class EncoderConfig(SpaceConfig):
    """The Encoder's user_config: the space, plus optional overrides of the app's batching args."""

    batching: bool | None = None
    max_batch_images: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)


def limit_torch_threads() -> None:
    """One torch thread per CPU the replica was given (at least one): replicas share the machine."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


class _SpaceHolder:
    """reconfigure(): validate the user_config, load the space it names beside the others, swap."""

    config_model: type[SpaceConfig] = SpaceConfig

    def __init__(self, args: AppArgs):
        limit_torch_threads()
        self.args = args
        self.spaces = SpaceVersions(keep=args.keep_spaces)
        self.reconfigure_error: str | None = None
        self._reconfigure_lock = asyncio.Lock()

    def _load(self, uri: str):
        raise NotImplementedError

    def _apply(self, config) -> None:
        """Settings of the user_config other than the space."""

    async def reconfigure(self, user_config: dict) -> None:
        async with self._reconfigure_lock:
            try:
                config = self.config_model.model_validate(user_config or {})
                uri = await asyncio.to_thread(resolve_space_uri, self.args.root, config.space)
                if self.spaces.current is None or uri != self.spaces.current.uri:
                    # load off the event loop: requests keep being answered by the old space meanwhile
                    loaded = self.spaces.get(uri) or await asyncio.to_thread(self._load, uri)
                    self.spaces.install(loaded)
                self._apply(config)
                self.reconfigure_error = None
            except Exception as exc:  # any failure: see below
                if self.spaces.current is None:
                    raise  # nothing to serve: the replica fails to start and Serve reports why
                # A bad new config must not take the service down: keep answering with the space
                # already loaded, and say so in /v1/info.
                self.reconfigure_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                logger.error(f"reconfigure failed, still serving {self.spaces.current.uri}: {self.reconfigure_error}")

    def current_uri(self) -> str:
        return self.spaces.current.uri

    def check_health(self) -> None:
        if self.spaces.current is None:
            raise RuntimeError("no space loaded")


@dataclass
class _Chunk:
    """Up to ``max_batch_images`` model-ready images of one request, with the space they need."""

    space: EncoderSpace
    images: torch.Tensor  # uint8 n x 3 x S x S


def _count_images(chunks: list[_Chunk]) -> int:
    return sum(int(c.images.shape[0]) for c in chunks)


def to_model_input(images, image_size: int) -> tuple[torch.Tensor, int]:
    """uint8 ``N x 3 x S x S`` from one ``N x 3 x H x W`` array or a list of ``3 x H x W`` arrays.

    Images not already ``S x S`` are resized one by one with the extractor's own resize (bilinear,
    antialiased, rounded: serve/inputs.py:resize_uint8), so a batch of one size gives exactly what
    the library's extractor computes. The ingress already resizes uploads as it decodes them, so
    this resizes only dataset samples and images sent during a switch to a space of another size.
    Returns (images, how many were resized).
    """
    def resize(x: torch.Tensor) -> torch.Tensor:
        return resize_uint8(x, image_size)

    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))  # arrays from Ray are read-only
        if x.shape[-2:] == (image_size, image_size):
            return x, 0
        return resize(x), int(x.shape[0])
    out, resized = [], 0
    for im in images:
        x = torch.from_numpy(np.require(im, np.uint8, ["C", "W"]))[None]
        if x.shape[-2:] != (image_size, image_size):
            x, resized = resize(x), resized + 1
        out.append(x)
    return torch.cat(out), resized


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    health_check_period_s=10,
)
class Encoder(_SpaceHolder):
    """uint8 images + labels -> the space's query embedding (extractor, then query encoder)."""

    config_model = EncoderConfig

    def __init__(self, args: AppArgs):
        super().__init__(args)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.batching = args.batching
        self.max_batch_images = args.max_batch_images
        logger.addFilter(_ImageCountBatchWarning())
        self._forward_lock = asyncio.Lock()  # one forward pass at a time, batched or not
        self.encoding = 0  # requests inside encode() now (one event loop: no lock needed)
        self._set_batch(args.max_batch_images, args.batch_wait_timeout_s)

    def _load(self, uri: str) -> EncoderSpace:
        return load_encoder_space(uri, device=self.device)

    def _set_batch(self, max_images: int, wait_s: float) -> None:
        # Ray's annotation of @serve.batch omits the setters its docs describe on the decorated method.
        self._features_batched.set_max_batch_size(max_images)  # type: ignore[attr-defined]
        self._features_batched.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    def _apply(self, config: EncoderConfig) -> None:
        if config.batching is not None:
            self.batching = config.batching
        if config.max_batch_images is not None or config.batch_wait_timeout_s is not None:
            self.max_batch_images = config.max_batch_images or self.max_batch_images
            self._set_batch(self.max_batch_images, config.batch_wait_timeout_s
                            if config.batch_wait_timeout_s is not None else self.args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_count_images)
    async def _features_batched(self, chunks: list[_Chunk]) -> list[torch.Tensor]:
        """One forward pass per space over the images of every queued chunk (usually one space)."""

        def run() -> list[torch.Tensor]:
            out: list[torch.Tensor | None] = [None] * len(chunks)
            groups: dict[str, list[int]] = {}
            for i, c in enumerate(chunks):
                groups.setdefault(c.space.uri, []).append(i)
            for members in groups.values():
                space = chunks[members[0]].space
                x = torch.cat([chunks[i].images for i in members])
                feats = space.extractor(x, batch_size=max(len(x), 1))
                sizes = [int(chunks[i].images.shape[0]) for i in members]
                for i, part in zip(members, torch.split(feats, sizes)):
                    out[i] = part
            done = [t for t in out if t is not None]
            if len(done) != len(out):  # cannot happen: every chunk is in exactly one group
                raise RuntimeError(f"features of {len(out) - len(done)} of {len(out)} chunks were not computed")
            return done

        async with self._forward_lock:
            return await asyncio.to_thread(run)

    async def _features(self, space: EncoderSpace, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, self.max_batch_images)
        if self.batching and (self.encoding > 1 or len(chunks) > 1):
            parts = await asyncio.gather(*(self._features_batched(_Chunk(space, c)) for c in chunks))
        else:  # batching off, or a lone request of one chunk: nothing to batch it with, so no wait
            parts = []
            for c in chunks:
                async with self._forward_lock:
                    parts.append(await asyncio.to_thread(space.extractor, c, len(c)))
        return torch.cat(parts)

    def image_size(self, pin: str | None = None) -> dict:
        """{space_uri, image_size} of space ``pin`` (or the current one): what the ingress resizes uploads to."""
        space = self.spaces.get(pin) or self.spaces.current
        return {"space_uri": space.uri, "image_size": int(space.image_size)}

    async def encode(self, images, labels: np.ndarray, pin: str | None = None) -> dict:
        """{space_uri, space_run, embedding, feature_mean, resized}, or {missing: pin, current} if ``pin``
        is not held. ``feature_mean`` (the query's mean extractor feature) is what the Index's
        nearest-dataset prior compares with the zoo tasks'."""
        space = self.spaces.get(pin)
        if space is None:
            return {"missing": pin, "current": self.spaces.current.uri}
        t0 = time.perf_counter()
        self.encoding += 1
        try:
            x, resized = await asyncio.to_thread(to_model_input, images, space.image_size)
            features = await self._features(space, x)
        finally:
            self.encoding -= 1

        def embed() -> np.ndarray:
            with torch.no_grad():
                return space.query_encoder(features, torch.from_numpy(np.array(labels, dtype=np.int64))).numpy()

        embedding = await asyncio.to_thread(embed)
        return {"space_uri": space.uri, "space_run": space.run, "embedding": embedding,
                "feature_mean": features.mean(0).numpy(), "resized": resized,
                "ms": (time.perf_counter() - t0) * 1e3}  # this replica's own time, for Server-Timing


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    health_check_period_s=10,
)
class Index(_SpaceHolder):
    """The space's model index: constraint mask, the ranking (the predictor blended with the
    nearest-dataset prior, or top-k by cosine and a predictor re-rank); zoo rows; info."""

    def _load(self, uri: str):
        return load_index_space(uri)

    def search(self, embedding: np.ndarray, pin: str, k: int, max_params: int | None, max_flops: int | None,
               family: str | None, rerank: bool, feature_mean: np.ndarray | None = None,
               prior_weight: float | None = None) -> dict:
        """The ranked candidates for a query embedding made with space ``pin`` (or {missing, current}).

        With the query's mean extractor feature and a prior weight > 0 (None: the service's), the
        ranking blends in the nearest-dataset prior exactly as ``tans search`` does
        (:meth:`tans.space.retrieval.Retriever.retrieve_images`)."""
        from tans.space.encoders import SpaceError
        from tans.space.retrieval import UnsatisfiableConstraint

        space = self.spaces.get(pin)
        if space is None:
            return {"missing": pin, "current": self.spaces.current.uri}
        t0 = time.perf_counter()
        try:
            query = torch.from_numpy(np.array(embedding, dtype=np.float32))
            weight = self.args.prior_weight if prior_weight is None else float(prior_weight)
            prior = space.retriever.nearest_prior(np.asarray(feature_mean, dtype=np.float32)[None]) \
                if weight > 0 and feature_mean is not None else None
            result = space.retriever.retrieve(query, torch.zeros(1), k=k, max_params=max_params,
                                              max_flops=max_flops, family=family, rerank=rerank, prior=prior,
                                              prior_weight=weight)
        except UnsatisfiableConstraint as exc:
            return {"error": str(exc), "status": 422}
        except SpaceError as exc:
            return {"error": str(exc), "status": 400}
        return {"space_uri": space.uri, "space_run": space.run, "requested_k": result.requested_k,
                "returned_k": result.returned_k, "note": result.note, "constraints": result.constraints,
                "prior_weight": result.prior_weight, "candidates": [vars(c) for c in result.candidates],
                "ms": (time.perf_counter() - t0) * 1e3}  # this replica's own time, for Server-Timing

    def model(self, model_id: str, embedding: bool = False) -> dict:
        """{space_run, space_uri, model: the zoo row} or {missing_model}."""
        space = self.spaces.current
        r = space.retriever
        row = r.row_of(model_id)
        if row is None:
            return {"missing_model": model_id, "space_run": space.run}
        record = r.index_table.slice(row, 1).to_pylist()[0]
        if not embedding:
            record.pop("embedding", None)
        return {"space_run": space.run, "space_uri": space.uri, "model": record}

    def info(self) -> dict:
        """Everything about the current space, from one snapshot (never two spaces mixed)."""
        from tans import __version__

        space = self.spaces.current
        r, info = space.retriever, space.retriever.info
        return {"space_run": space.run, "space_uri": space.uri, "zoo": info.get("zoo"), "family": info.get("family"),
                "index_size": len(r), "families": sorted({str(f) for f in r.families}),
                "extractor": info.get("extractor"), "image_size": info.get("image_size"),
                "feature_dim": info.get("feature_dim"), "embed_dim": int(r.embeddings.shape[1]),
                "version": __version__, "api_version": "v1", "reconfigure_error": self.reconfigure_error}
