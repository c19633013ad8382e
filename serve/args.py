"""The typed arguments of ``build_app`` (the ``args:`` of the application in serve/config.yaml).

The space itself is *not* an argument: it is the ``space`` key of the Encoder's and the Index's
``user_config``, so it can change at run time through ``reconfigure`` (see serve/spaces.py).
``space`` below is only the initial value used when the app is built from Python
(``tans serve``, tests); a deployment's ``user_config`` in a Serve config file overrides it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TOKEN_ENV = "TANS_SERVE_TOKEN"


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, description="storage root of datasets and bare run names "
                                               "(default: $TANS_ROOT, else ~/.cache/tans)")
    space: str = Field("LATEST", description="initial space when built from Python: LATEST, a run name or a URI")
    # request limits
    max_images: int = Field(2000, ge=2, description="images per request (more -> 413)")
    max_body_mb: float = Field(32.0, gt=0, description="request body size (more -> 413)")
    max_image_side: int = Field(1024, ge=8, description="largest image side in pixels (more -> 413)")
    max_k: int = Field(100, ge=1, description="largest k a request may ask for (more -> 400)")
    per_class: int = Field(20, ge=1, description="default images per class sampled from a `dataset`")
    max_per_class: int = Field(200, ge=1, description="largest per_class a request may ask for")
    # batching in the Encoder (the encoder's user_config may override these three at run time)
    batching: bool = Field(True, description="share extractor forward passes across concurrent requests")
    max_batch_images: int = Field(256, ge=1, description="images per extractor forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    # versions and auth
    keep_spaces: int = Field(2, ge=1, description="space versions a replica keeps for requests pinned to them")
    switch_timeout_s: float = Field(10.0, gt=0, description="how long a request waits for encoder and index "
                                                            "to hold the same space during a switch (then 503)")
    auth_token_env: str = Field(DEFAULT_TOKEN_ENV, description="environment variable holding the bearer token; "
                                                               "unset or empty = no auth")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
