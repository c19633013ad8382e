"""`tans serve`: the online retriever on a local Ray, listening on 127.0.0.1 until Ctrl-C.

    tans serve [--space URI] [--root ROOT] [--port 8000] [--host 127.0.0.1] [--fused] [--direct-ingress]

The space defaults to the root's ``spaces/LATEST``; it is resolved to one run *before* Ray
starts, so a missing space is a one-line error (exit 1) and every replica serves the same run.
On a cluster use ``serve deploy serve/config.yaml`` (or the RayService) instead.

``--direct-ingress``: the Ingress replica also answers HTTP itself on a port of its own (printed
at start-up), without the proxy's hop; the proxy's port keeps answering too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tans serve", description="serve the retriever over HTTP (Ray Serve)")
    parser.add_argument("--space", default="", help="space URI (<root>/spaces/<run>), a run name in --root, "
                                                     "or empty for the root's spaces/LATEST")
    parser.add_argument("--root", default=None, help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument(
        "--token-env",
        default=None,
        help="environment variable holding the bearer token (default TANS_SERVE_TOKEN); unset = no auth",
    )
    parser.add_argument("--fused", action="store_true",
                        help="one process: the Ingress encodes and searches itself (no hops between deployments)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="the Ingress replica also answers HTTP on a port of its own (printed), skipping "
                             "the proxy: lower latency for clients that call it there (Ray Serve direct ingress)")
    parser.add_argument("--behind-auth-proxy", action="store_true",
                        help="allow a non-loopback --host without a token: an authenticating proxy is the only way in")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    from serve.args import DEFAULT_TOKEN_ENV, AppArgs, check_exposure
    from serve.spaces import resolve_space_uri
    from tans.config import ConfigError
    from tans.storage import Storage

    if ns.direct_ingress and os.environ.get("RAY_ADDRESS"):  # that Ray's processes started without it
        raise ConfigError("--direct-ingress: Ray is already running (RAY_ADDRESS is set); start that Ray with "
                          "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in its environment instead")
    token_env = ns.token_env or DEFAULT_TOKEN_ENV
    # before Ray: nothing may listen beyond loopback, even for a moment, without authentication
    check_exposure(ns.host, _has_token(token_env), ns.behind_auth_proxy)
    root = Storage(ns.root).uri
    space = resolve_space_uri(root, ns.space)  # SpaceNotFound -> "error: ..." and exit 1, before Ray
    args = AppArgs(root=root, space=space, auth_token_env=token_env, behind_auth_proxy=ns.behind_auth_proxy,
                   fused=ns.fused)

    from ray import serve

    from jobs.runtime import init_ray
    from serve.app import build_app
    from serve.args import set_serve_env
    from serve.deploy import direct_ingress_urls

    set_serve_env(direct_ingress=ns.direct_ingress)
    ray = init_ray()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill, a container stop: the same clean shutdown
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name="tans", route_prefix="/")
        url = f"http://{ns.host}:{ns.port}"
        auth = "on" if args.auth_token_env and _has_token(args.auth_token_env) else "off"
        print(f"serving {space} at {url}/v1/retrieve (API docs: {url}/docs; auth {auth}); Ctrl-C stops", flush=True)
        for direct in direct_ingress_urls(ns.host):
            print(f"direct ingress (no proxy hop): {direct}/v1/retrieve", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _has_token(env: str) -> bool:
    return bool(os.environ.get(env))


if __name__ == "__main__":
    from jobs._common import run_main

    sys.exit(run_main(main))
