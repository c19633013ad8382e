"""The typed arguments of ``build_app`` (the ``args:`` of the application in serve/config.yaml).

The space itself is *not* an argument: it is the ``space`` key of the Encoder's and the Index's
``user_config``, so it can change at run time through ``reconfigure`` (see serve/spaces.py).
``space`` below is only the initial value used when the app is built from Python
(``tans serve``, tests); a deployment's ``user_config`` in a Serve config file overrides it.

Bounds on untrusted input, all per request unless said otherwise (each field says its status):

* body: ``max_body_mb`` (413, refused from Content-Length or while streaming);
* images: ``max_images`` per request, ``max_image_side`` and ``max_image_pixels`` per image, and
  ``max_pixels_per_request`` (default 64 M) summed over the request's images; all four are
  checked from the image *headers* before any pixel is decoded (413). Each image is then decoded
  and at once resized to the extractor's input size, so decoded memory is
  ``n_images x 3 x side^2`` bytes of the extractor, whatever the uploaded sizes;
* time: ``request_timeout_s`` from the request's arrival to its answer (504);
* load: ``max_queued_requests`` requests held at once by one ingress replica (503 with
  ``Retry-After``, answered before the body is read);
* exposure: the app refuses to start when Serve listens on a non-loopback address and no bearer
  token is set, unless ``behind_auth_proxy`` says an authenticating proxy is the only way in
  (:func:`check_exposure`).
"""

from __future__ import annotations

import ipaddress
import os

from pydantic import BaseModel, ConfigDict, Field

from tans.config import ConfigError
from tans.space.prior import DEFAULT_PRIOR_WEIGHT

DEFAULT_TOKEN_ENV = "TANS_SERVE_TOKEN"
RETRY_AFTER_S = 1  # the Retry-After of a 503 from a full ingress replica

# Ray Serve's own latency switches (two of those its RAY_SERVE_THROUGHPUT_OPTIMIZED mode sets):
# a replica runs its user code, and a handle its router, on the process's main event loop instead
# of a thread of their own. Every hop between the proxy and the three deployments then skips two
# cross-thread handoffs: measured on 2 cores, a deployment call with a 50-image array took 7 ms
# instead of 15, and 16 clients got 16 instead of 11 requests/s (bench/serve_load.py). Safe here
# because no handler of this app blocks its event loop: decoding, forward passes and index
# searches run in worker threads (asyncio.to_thread, or Serve's thread pool for sync methods).
# serve/config.yaml sets them for the replicas (runtime_env); `tans serve` sets them for its
# local Ray, the proxy included; on a cluster the project image (Dockerfile ENV) sets them for
# every Ray process, proxies included (tests/cluster/test_manifests.py keeps all four equal).
SERVE_LATENCY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


# `tans serve --direct-ingress`: Ray Serve's direct ingress (experimental in Ray 2.60). The
# Ingress replica answers HTTP itself, on a port of its own (30000-31000) on Serve's host, beside
# the proxy's port: no proxy hop, and the body arrives in the process that decodes it. Measured
# on 2 cores it saves the proxy's ~7 ms and most of the body's arrival (bench/serve_load.py
# --direct-ingress). Every Ray process reads these when it starts, so they are set before Ray is.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # Serve keeps a stopping ingress replica alive this long (default 30 s) so that an external
    # load balancer can take it out first; one machine has none, and a shutdown should not wait.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def set_serve_env(direct_ingress: bool = False) -> None:
    """SERVE_LATENCY_ENV (and DIRECT_INGRESS_ENV if asked) into this process's environment, where
    not already set, before Ray starts: a local Ray's proxy and replicas inherit it (export one of
    them otherwise to override it)."""
    for name, value in {**SERVE_LATENCY_ENV, **(DIRECT_INGRESS_ENV if direct_ingress else {})}.items():
        os.environ.setdefault(name, value)


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, description="storage root of datasets and bare run names "
                                               "(default: $TANS_ROOT, else ~/.cache/tans)")
    space: str = Field("LATEST", description="initial space when built from Python: LATEST, a run name or a URI")
    # request limits
    max_images: int = Field(2000, ge=2, description="images per request (more -> 413)")
    max_body_mb: float = Field(32.0, gt=0, description="request body size (more -> 413)")
    max_image_side: int = Field(1024, ge=8, description="largest image side in pixels, read from the image "
                                                        "header before decoding (more -> 413)")
    max_image_pixels: int = Field(1024 * 1024, ge=64, description="largest width x height of one image, read "
                                                                  "from its header before decoding (more -> 413)")
    max_pixels_per_request: int = Field(64_000_000, ge=64, description=(
        "decoded-pixel budget of a request: the sum of width x height over its images, read from their headers "
        "before any image is decoded (more -> 413; 64 M = 61 images of 1024x1024 or 1275 of 224x224)"))
    max_k: int = Field(100, ge=1, description="largest k a request may ask for (more -> 400)")
    prior_weight: float = Field(DEFAULT_PRIOR_WEIGHT, ge=0, description=(
        "default weight of the nearest-dataset prior in the ranking, as in `tans search`: z(predicted accuracy) "
        "+ prior_weight * z(nearest-dataset score); 0 ranks by the space alone (a request may set its own)"))
    per_class: int = Field(20, ge=1, description="default images per class sampled from a `dataset`")
    max_per_class: int = Field(200, ge=1, description="largest per_class a request may ask for")
    request_timeout_s: float = Field(60.0, gt=0, description=(
        "how long one request may take in the ingress, from its arrival (body upload included) to its answer "
        "(more -> 504; image decoding stops between two images)"))
    max_queued_requests: int = Field(32, ge=1, description=(
        "requests one ingress replica holds at once (reading, decoding, waiting for the models; /v1/healthz "
        "and the docs not counted); one more is answered 503 with Retry-After at once, its body unread. "
        "Keep it below the Ingress's max_ongoing_requests, or Serve queues the excess in the proxy instead"))
    # layout
    fused: bool = Field(False, description=(
        "one process: each Ingress replica encodes and searches itself, with no Encoder or Index deployment and "
        "no hop between deployments (lower latency on one machine; every Ingress replica holds the models). The "
        "space and the batching settings are then the Ingress's user_config"))
    # batching in the Encoder (the encoder's user_config may override these three at run time)
    batching: bool = Field(True, description="share extractor forward passes across concurrent requests")
    max_batch_images: int = Field(256, ge=1, description="images per extractor forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    # versions and auth
    keep_spaces: int = Field(2, ge=1, description="space versions a replica keeps for requests pinned to them")
    switch_timeout_s: float = Field(10.0, gt=0, description="how long a request waits for encoder and index "
                                                            "to hold the same space during a switch (then 503)")
    auth_token_env: str = Field(DEFAULT_TOKEN_ENV, description="environment variable holding the bearer token; "
                                                               "unset or empty = no auth (loopback only, see "
                                                               "behind_auth_proxy)")
    behind_auth_proxy: bool = Field(False, description=(
        "true only when an authenticating proxy is the sole way to reach Serve's HTTP port: lets the app start "
        "on a non-loopback address without a token. Otherwise such a start is refused"))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ExposureError(ConfigError):
    """The service would listen beyond loopback with no authentication (one-line message)."""


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0, ::, names."""
    text = (host or "").strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False  # a host name or an empty host: it may resolve anywhere, so not loopback


def check_exposure(host: str | None, has_token: bool, behind_auth_proxy: bool) -> None:
    """Refuse (:class:`ExposureError`) to serve on a non-loopback ``host`` without a token or a proxy.

    ``host`` None means Serve starts no HTTP proxy: nothing listens, nothing to refuse.
    """
    if host is None or has_token or behind_auth_proxy or is_loopback(host):
        return
    raise ExposureError(
        f"refusing to serve on {host} (not a loopback address) without a bearer token: set the token variable "
        "(auth_token_env, default $TANS_SERVE_TOKEN), listen on 127.0.0.1, or set behind_auth_proxy: true if "
        "an authenticating proxy is the only way in")
