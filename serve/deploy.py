"""Deploy serve/config.yaml from Python the way `serve deploy` and KubeRay do (tests, benchmark).

A config deploy keeps the app's code version as long as ``import_path``, ``args`` and
``runtime_env`` stay the same, so a new ``user_config`` (another ``space``, batching on/off)
reconfigures the running replicas in place instead of replacing them; ``serve.run`` of a Python
app always replaces them. Needs a running Serve (``serve.start``).

The app's builder runs where Serve runs, so it reads the address Serve listens on and the token
variable there: on a non-loopback address with no token (and no ``behind_auth_proxy: true``) the
deploy fails, and :func:`apply_config` raises that refusal as one line
(:class:`serve.args.ExposureError`) instead of Serve's traceback.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml

CONFIG_PATH = Path(__file__).with_name("config.yaml")


def app_config(space: str | None = None, args: dict | None = None, deployments: dict | None = None,
               path: Path = CONFIG_PATH, fused: bool = False) -> dict:
    """serve/config.yaml with overrides: ``space`` for every user_config that has one, extra ``args``,
    and per-deployment option overrides (``{"Encoder": {"user_config": {...}, "num_replicas": 1}}``;
    ``user_config`` is merged, other options replace). ``fused``: the one-process layout, see
    :func:`fused_layout`."""
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    (app,) = config["applications"]
    app["args"].update(args or {})
    if fused:
        fused_layout(app)
    for d in app["deployments"]:
        if space is not None and "user_config" in d:
            d["user_config"] = {**d["user_config"], "space": space}
        for key, value in (deployments or {}).get(d["name"], {}).items():
            d[key] = {**d.get(key, {}), **value} if key == "user_config" else value
    return config


def fused_layout(app: dict) -> None:
    """Turn one application of a config into the fused layout (``args.fused: true``), in place.

    The Ingress alone: it takes the Encoder's ``user_config`` (space, batching) and CPU share, the
    two model deployments' entries go (Serve refuses options for deployments an app does not have).
    """
    app["args"]["fused"] = True
    by_name = {d["name"]: d for d in app["deployments"]}
    encoder, ingress = by_name.get("Encoder", {}), by_name["Ingress"]
    ingress["user_config"] = dict(encoder.get("user_config", {"space": "LATEST"}))
    ingress["ray_actor_options"] = {**ingress.get("ray_actor_options", {}),
                                    **encoder.get("ray_actor_options", {"num_cpus": 1})}
    app["deployments"] = [ingress]


def apply_config(config: dict, timeout_s: float = 240) -> None:
    """Deploy ``config`` on the running Serve and wait until every app in it is RUNNING."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # the call `serve deploy` makes through the dashboard and `serve run config.yaml` makes directly
    client = _get_global_client()  # raises RayServeException when no Serve is running
    if client is None:
        raise RuntimeError("no running Ray Serve to deploy on")
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    names = [a["name"] for a in config["applications"]]
    deadline = time.monotonic() + timeout_s
    states: dict = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        if any(s == "DEPLOY_FAILED" for s in states.values()):
            raise_deploy_failure([m for n in names if n in apps for m in _messages(apps[n])])
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"apps not running after {timeout_s:.0f}s: {states}")


def direct_ingress_urls(host: str, app: str = "tans") -> list[str]:
    """``http://HOST:PORT`` of each Ingress replica of ``app`` that answers HTTP itself (direct
    ingress, :data:`serve.args.DIRECT_INGRESS_ENV`); [] when this Ray runs without it.

    A replica listens on Serve's own host: ``host``, unless that is a wildcard (0.0.0.0, ::),
    where the replica's node address is the one to reach it by. Reads the Serve controller's
    routing table (``get_target_groups``, what Serve's HAProxy integration reads: no public API
    gives the replicas' ports in Ray 2.60).
    """
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("no running Ray Serve")
    groups = ray.get(client._controller.get_target_groups.remote(app))
    urls = []
    for group in groups:
        if getattr(group.protocol, "value", str(group.protocol)) != "HTTP":
            continue
        for target in group.targets:
            if target.port and target.port > 0:
                urls.append(f"http://{target.ip if host in ('0.0.0.0', '::', '') else host}:{target.port}")
    return sorted(set(urls))


def _messages(app) -> list[str]:
    """An application status's message, then each of its deployments' (where the replicas' errors are)."""
    return [app.message] + [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]


def raise_deploy_failure(messages: list[str]) -> None:
    """The failure of a deploy: its :class:`~serve.args.ExposureError` line if the builder refused, else all."""
    from serve.args import ExposureError

    for message in messages:
        for line in str(message).splitlines():
            if "ExposureError: " in line:
                raise ExposureError(line.split("ExposureError: ", 1)[1].strip())
    raise RuntimeError(f"deploy failed: {messages}")
