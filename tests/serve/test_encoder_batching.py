"""The Encoder's batching, called in one event loop without Ray: which forward passes it makes.

Concurrent requests share one extractor forward pass; a request alone in the Encoder skips the
batch queue (its wait would only add latency); with batching off every request gets its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import types

import numpy as np
import pytest
import torch

import serve.deployments
from serve.args import AppArgs
from serve.spaces import EncoderSpace

SIZE = 8


class RecordingExtractor:
    """Mean colour per image as the 'feature'; records how many images each forward pass got."""

    def __init__(self):
        self.passes: list[int] = []
        self.in_pass = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        with self._lock:
            self.in_pass += 1
            self.overlapped |= self.in_pass > 1
            self.passes.append(int(x.shape[0]))
        try:
            return x.float().mean(dim=(2, 3))
        finally:
            with self._lock:
                self.in_pass -= 1


def query_encoder(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([features.mean(0), labels.float().mean()[None]])


# @serve.batch keeps one queue per decorated method, bound to the event loop that first used it (a
# replica has one loop for its life), so every test here runs in this one loop, on a private copy
# of the module: the real Encoder class is pickled when other tests deploy it, and a queue holding
# this loop's futures would make it unpicklable.
LOOP = asyncio.new_event_loop()
_spec = importlib.util.spec_from_file_location("_deployments_under_test", serve.deployments.__file__)
assert _spec is not None and _spec.loader is not None
deployments = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = deployments  # dataclasses look their module up there
_spec.loader.exec_module(deployments)


def run(coro):
    return LOOP.run_until_complete(asyncio.wait_for(coro, timeout=20))


@pytest.fixture
def make_encoder(monkeypatch):
    import ray.serve

    monkeypatch.setattr(deployments, "limit_torch_threads", lambda: None)  # no Ray runtime context here
    # @serve.batch reads the replica's max_ongoing_requests when its queue starts (to warn)
    replica = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: replica)

    def make(**args):
        encoder = deployments.Encoder.func_or_class(AppArgs(**args))
        extractor = RecordingExtractor()
        encoder.spaces.install(EncoderSpace(uri="mem://space", run="run", extractor=extractor,
                                            query_encoder=query_encoder, image_size=SIZE))
        return encoder, extractor

    return make


def request(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8), np.arange(n) % 2


def expected_embedding(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return query_encoder(torch.from_numpy(images).float().mean(dim=(2, 3)), torch.from_numpy(labels)).numpy()


def test_a_lone_request_skips_the_batch_queue(make_encoder):
    # a wait that would dominate the test if the lone request queued for it
    encoder, extractor = make_encoder(batching=True, batch_wait_timeout_s=30.0)
    images, labels = request(5, 0)

    out = run(encoder.encode(images, labels))

    assert extractor.passes == [5]
    np.testing.assert_allclose(out["embedding"], expected_embedding(images, labels), rtol=1e-6)
    assert encoder.encoding == 0


def test_concurrent_requests_share_one_forward_pass_with_the_same_answers(make_encoder):
    encoder, extractor = make_encoder(batching=True, batch_wait_timeout_s=0.5)
    queries = [request(n, seed) for seed, n in enumerate((3, 5, 4))]

    async def all_at_once():
        return await asyncio.gather(*(encoder.encode(im, y) for im, y in queries))

    outs = run(all_at_once())

    assert extractor.passes == [12]  # one pass over the 3 + 5 + 4 images
    for out, (images, labels) in zip(outs, queries):
        np.testing.assert_allclose(out["embedding"], expected_embedding(images, labels), rtol=1e-6)
        np.testing.assert_allclose(out["feature_mean"], torch.from_numpy(images).float().mean(dim=(0, 2, 3)),
                                   rtol=1e-6)
    assert encoder.encoding == 0


def test_without_batching_each_request_gets_its_own_pass_one_at_a_time(make_encoder):
    encoder, extractor = make_encoder(batching=False)
    queries = [request(n, seed) for seed, n in enumerate((3, 5, 4))]

    async def all_at_once():
        return await asyncio.gather(*(encoder.encode(im, y) for im, y in queries))

    outs = run(all_at_once())

    assert sorted(extractor.passes) == [3, 4, 5] and not extractor.overlapped
    for out, (images, labels) in zip(outs, queries):
        np.testing.assert_allclose(out["embedding"], expected_embedding(images, labels), rtol=1e-6)


def test_a_request_larger_than_a_batch_is_cut_into_chunks(make_encoder):
    encoder, extractor = make_encoder(batching=True, max_batch_images=4, batch_wait_timeout_s=0.01)
    images, labels = request(10, 3)

    out = run(encoder.encode(images, labels))

    assert sum(extractor.passes) == 10 and max(extractor.passes) <= 4
    np.testing.assert_allclose(out["embedding"], expected_embedding(images, labels), rtol=1e-5)
