"""A real Serve app on 127.0.0.1 (a free port) over two tiny random spaces and a tiny task.

The app is deployed the way `serve deploy` and KubeRay deploy it: serve/config.yaml through the
controller's config API, with only the test's root, limits and CPU shares overridden. Changing
the `space` of its user_configs then reconfigures the replicas in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from serve.deploy import app_config as config_with
from serve.deploy import apply_config
from tests.conftest import free_port

LIMITS = {"max_images": 64, "max_body_mb": 0.25, "max_image_side": 512, "max_pixels_per_request": 200_000,
          "max_k": 20, "per_class": 3, "max_per_class": 10, "switch_timeout_s": 20}
SMALL_CPU = {"Encoder": 0.2, "Index": 0.1, "Ingress": 0.1}  # fits beside another suite's 2-CPU Ray


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/serve/test_http" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def serve_root(tmp_path_factory):
    """root/spaces/{runA (LATEST), runB}, root/tasks/toytask."""
    from serve.toy import make_toy_space, make_toy_task

    root = tmp_path_factory.mktemp("serve-root")
    make_toy_space(str(root), "runA", seed=0, n_tasks=3, per_task=4, embed_dim=8)
    make_toy_space(str(root), "runB", seed=1, n_tasks=4, per_task=4, embed_dim=12, set_latest=False)
    make_toy_task(str(root), "toytask", n_classes=3, per_class=6, size=24)
    return root


def app_config(root: Path, space: str) -> dict:
    """serve/config.yaml with the test's root, limits, CPU shares and space."""
    return config_with(
        space=space,
        args={"root": str(root), **LIMITS},
        deployments={name: {"ray_actor_options": {"num_cpus": cpus}} for name, cpus in SMALL_CPU.items()},
    )


@contextmanager
def running_app(config: dict, tmp_path_factory):
    """Base URL of ``config`` deployed on 127.0.0.1, on a Ray of its own unless one is already up here."""
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apply_config(config)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/healthz", timeout=30).status_code == 200
        yield url
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


@pytest.fixture(scope="module")
def serve_url(serve_root, tmp_path_factory):
    """Base URL of the app (space runA)."""
    with running_app(app_config(serve_root, "runA"), tmp_path_factory) as url:
        yield url
