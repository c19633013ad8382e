"""Loaded space versions inside a replica, and how a request pins one of them.

Each space-dependent deployment (Encoder, Index) keeps the spaces it has loaded in a
:class:`SpaceVersions`: the current one plus up to ``keep - 1`` older ones, keyed by the space's
URI (``<root>/spaces/<run>``). ``reconfigure`` loads a new space *beside* the old ones and then
swaps two references; nothing is mutated in place, so a request that already holds a space
object finishes on it, and a request pinned to the previous URI can still be answered by it.
No ``import ray`` here.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tans.storage import Storage

LATEST_NAMES = ("", "LATEST")


def resolve_space_uri(root: str | None, space: str | None) -> str:
    """The concrete ``<root>/spaces/<run>`` URI a ``space`` setting names, read now.

    ``space`` is ``""``/``"LATEST"`` (the root's ``spaces/LATEST``), a bare run name (in
    ``root``), or a full URI (``<root>/spaces/<run>`` or another root, whose LATEST is used).
    Raises :class:`tans.space.store.SpaceNotFound` when nothing finished is there.
    """
    from tans.space.store import read_space_info, resolve_space, space_dir

    text = (space or "").strip()
    if text in LATEST_NAMES:
        storage, run = resolve_space(Storage(root).uri)
    elif "/" not in text and ":" not in text and "\\" not in text:
        storage, run = Storage(root), text
    else:
        storage, run = resolve_space(text)
    read_space_info(storage, run)  # a missing or unfinished space fails here, with its path
    return storage.uri_of(space_dir(run))


class SpaceSwitchTimeout(RuntimeError):
    """Encoder and Index did not hold a common space within the timeout."""


async def with_one_space(encode: Callable[[str | None], Awaitable[dict]], search: Callable[[dict], Awaitable[dict]],
                         timeout_s: float, poll_s: float = 0.05) -> tuple[dict, dict]:
    """(encoded, searched): one query encoded and searched with the *same* space.

    ``encode(pin)`` answers ``{"space_uri": ..., ...}`` made with space ``pin`` (None: its current
    one) or ``{"missing": pin}``; ``search(encoded)`` searches with ``encoded["space_uri"]`` or
    answers ``{"missing": uri, "current": its current uri}``. Typical switch: the Encoder is on the
    new space while the Index still is on the old one, or the reverse; since each keeps the
    previous space, the second try (the Encoder pinned to the Index's space) succeeds at once. A
    replica that never held the other's space (started after the switch) makes this wait
    ``poll_s`` between tries, for at most ``timeout_s``, then :class:`SpaceSwitchTimeout`. The
    first try takes the Encoder's current space.
    """
    deadline = time.monotonic() + timeout_s
    pin: str | None = None
    while True:
        encoded = await encode(pin)
        wait = True
        if "missing" not in encoded:
            searched = await search(encoded)
            if "missing" not in searched:
                return encoded, searched
            pin, wait = searched["current"], False  # ask the Encoder for the Index's space right away
        else:
            pin = None  # the Encoder does not hold the Index's space (yet): take whatever it has
        if time.monotonic() > deadline:
            raise SpaceSwitchTimeout(f"encoder and index held no common space within {timeout_s:g}s")
        if wait:
            await asyncio.sleep(poll_s)


class SpaceVersions:
    """Loaded spaces by URI (oldest first) and the current one; replaced, never mutated."""

    def __init__(self, keep: int = 2):
        self.keep = max(1, int(keep))
        self._by_uri: OrderedDict[str, Any] = OrderedDict()
        self.current: Any = None

    def get(self, uri: str | None):
        """The space ``uri`` (None: the current one), or None if it is not loaded here."""
        return self.current if uri is None else self._by_uri.get(uri)

    def install(self, space) -> None:
        """Make ``space`` (any object with a ``uri``) current, dropping the oldest beyond ``keep``."""
        by_uri = OrderedDict(self._by_uri)
        by_uri.pop(space.uri, None)
        by_uri[space.uri] = space
        while len(by_uri) > self.keep:
            by_uri.popitem(last=False)
        self._by_uri = by_uri  # a reader sees the old or the new dict, never a half-updated one
        self.current = space

    def uris(self) -> list[str]:
        return list(self._by_uri)


@dataclass(frozen=True)
class EncoderSpace:
    """What the Encoder needs of one space: its frozen extractor and its query encoder."""

    uri: str
    run: str
    extractor: Any  # tans.space.features.FeatureExtractor
    query_encoder: nn.Module
    image_size: int


def load_encoder_space(uri: str, device: str = "cpu") -> EncoderSpace:
    from tans.space.features import ExtractorSpec, build_extractor
    from tans.space.store import load_space_model, read_space_info, resolve_space

    storage, run = resolve_space(uri)
    info = read_space_info(storage, run)
    model = load_space_model(storage, run, info)
    spec = ExtractorSpec.from_dict(info["extractor"])
    return EncoderSpace(uri=uri, run=run, extractor=build_extractor(spec, device=device),
                        query_encoder=model.query_encoder.eval(), image_size=spec.image_size)


class GivenEmbedding(nn.Module):
    """Stands in for a Retriever's query encoder: the Encoder deployment has already run the real one.

    ``Retriever.retrieve(embedding, labels)`` then does exactly what the library does after
    encoding (constraint mask, top-k by cosine, predictor re-rank, notes, the unsatisfiable
    error naming the smallest model), with no second copy of that logic here.
    """

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return embedding


@dataclass(frozen=True)
class IndexSpace:
    """What the Index needs of one space: a Retriever over its index whose query is an embedding,
    holding the zoo tasks' mean query features (the nearest-dataset prior), read at load time."""

    uri: str
    run: str
    retriever: Any  # tans.space.retrieval.Retriever with a GivenEmbedding query encoder


def load_index_space(uri: str) -> IndexSpace:
    from tans.space.retrieval import Retriever

    full = Retriever.load(uri)
    retriever = Retriever(full.model_ids, full.tasks, full.n_params, full.flops, full.families,
                          full.embeddings.numpy(), GivenEmbedding(), full.predictor, info=full.info,
                          extractor_spec=full.extractor_spec, index_table=full.index_table,
                          task_means=full.task_means)
    return IndexSpace(uri=uri, run=str(full.info["run"]), retriever=retriever)
