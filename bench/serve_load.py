"""HTTP load on the Serve app: latency and throughput at 1, 4 and 16 clients, batching on and off.

    python bench/serve_load.py [--seconds 4] [--max-requests 120] [--pairs 10] [--classes 5]
                               [--per-class 10] [--space URI] [--formats json,multipart] [--small 2]
                               [--layouts split,fused] [--direct-ingress]

Starts a local Ray and Serve on 127.0.0.1 (a free port), deploys serve/config.yaml with one replica
per deployment (no autoscaling, so the rows compare like with like) over a tiny random space
(serve/toy.py; or ``--space``), and sends one fixed query (``--classes`` x ``--per-class`` PNG
images at the extractor's size, as base64 JSON and as a multipart upload) from N client threads,
plus many small requests (``--small`` images, 2 classes) where batching across requests can help.
Each cell runs for at most ``--seconds`` and ``--max-requests``. Batching is switched by
reconfiguring the Encoder's user_config in place (no restart). Both layouts are measured in turn:
``split`` (Ingress -> Encoder, Index: three deployments) and ``fused`` (``args.fused``: the Ingress
encodes and searches in its own process). The ratio: ``--pairs`` single HTTP
requests alternating with ``Retriever.retrieve_images`` on the same images in a Ray actor (one
torch thread and the same niceness as the Encoder replica), medians of each; the answers'
``Server-Timing`` headers split the HTTP time into the proxy, the Ingress's decoding, each
deployment's own work and the hops between them. Ray Serve's latency switches are set as `tans
serve` sets them (serve/args.py: SERVE_LATENCY_ENV; export one as 1 to compare). With
``--direct-ingress`` Ray starts with Serve's direct ingress on (`tans serve --direct-ingress`), and
every cell is also measured against the Ingress replica's own port (layout ``<layout>/direct``):
the proxy and the direct path in one run, on the same replicas. Everything listens on 127.0.0.1
and is shut down at the end."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # an embedded Ray on loopback

import numpy as np
import requests
import torch

CLIENTS = (1, 4, 16)
ONE_REPLICA = {"num_replicas": 1, "autoscaling_config": None}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def multipart_body(images: np.ndarray, labels: np.ndarray, k: int = 10) -> tuple[bytes, str]:
    """One multipart/form-data body (``images`` files + ``labels`` and ``k`` fields), encoded once."""
    from urllib3 import encode_multipart_formdata

    from tans.data.tasks import encode_png

    fields = [("images", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(images)]
    fields += [("labels", ",".join(str(int(y)) for y in labels)), ("k", str(k))]
    return encode_multipart_formdata(fields)


def load_cell(url: str, body: bytes, clients: int, seconds: float, max_requests: int,
              ctype: str = "application/json") -> dict:
    """``clients`` threads post ``body`` until ``seconds`` pass or ``max_requests`` are sent."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    t_end = time.monotonic() + seconds

    def client():
        with requests.Session() as s:
            while time.monotonic() < t_end:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                r = s.post(url, data=body, headers={"content-type": ctype}, timeout=120)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else errors.append(r.text[:200]))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "rps": len(latencies) / wall, "first_error": errors[0] if errors else ""}


class InProcess:
    """``Retriever.retrieve_images`` on the same images, one torch thread, without Serve in between.

    Used as a Ray actor: Ray runs its workers (the Serve replicas too) at niceness 15, so timing
    the library in the nice-0 driver would flatter it on a busy machine; an actor competes for
    the CPUs exactly like the Encoder replica does.
    """

    def __init__(self, space_uri: str, images: np.ndarray, labels: np.ndarray):
        from tans.space.retrieval import Retriever

        torch.set_num_threads(1)
        self.retriever = Retriever.load(space_uri)
        self.images, self.labels = np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels
        for _ in range(3):  # builds the extractor, warms up
            self.retriever.retrieve_images(self.images, self.labels, k=10)

    def seconds(self) -> float:
        t0 = time.perf_counter()
        self.retriever.retrieve_images(self.images, self.labels, k=10)
        return time.perf_counter() - t0


def lockstep_ratio(
    url: str, body: bytes, in_process, pairs: int, ctype: str = "application/json"
) -> tuple[float, float, dict[str, float]]:
    """Median (HTTP seconds, in-process seconds, where the HTTP time went in ms) over ``pairs``
    alternating requests: both see the same load. The split comes from the answers' Server-Timing."""
    import ray

    from serve.timing import parse_server_timing

    http, lib, parts = [], [], []
    with requests.Session() as s:
        for _ in range(pairs):
            t0 = time.perf_counter()
            r = s.post(url, data=body, headers={"content-type": ctype}, timeout=120)
            http.append(time.perf_counter() - t0)
            r.raise_for_status()
            parts.append(time_split(http[-1] * 1e3, parse_server_timing(r.headers.get("Server-Timing", ""))))
            lib.append(ray.get(in_process.seconds.remote()))
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]} if parts and parts[0] else {}
    return statistics.median(http), statistics.median(lib), split


# The parts of one HTTP request, in the order they happen.
SPLIT = ("proxy+client", "read", "decode", "encode hop", "encoder", "search hop", "index", "ingress other")


def time_split(total_ms: float, t: dict[str, float]) -> dict[str, float]:
    """One request's ``total_ms`` split by its Server-Timing: what the client saw outside the
    Ingress (proxy, HTTP), the body's arrival in the Ingress and its decoding, each deployment's
    own work and the hop around it, and the Ingress's remaining time (auth, validation, the
    answer's JSON). {} without the header."""
    if not {"ingress", "read", "decode", "encode", "encoder", "search", "index"} <= set(t):
        return {}
    return {"proxy+client": total_ms - t["ingress"], "read": t["read"], "decode": t["decode"],
            "encode hop": t["encode"] - t["encoder"], "encoder": t["encoder"],
            "search hop": t["search"] - t["index"], "index": t["index"],
            "ingress other": t["ingress"] - t["read"] - t["decode"] - t["encode"] - t["search"]}


def report(ns: argparse.Namespace, rows: list[dict], ratios: dict, formats: list[str], n_images: int,
           body_bytes: int, run: str, layouts: list[str]) -> None:
    """The table of cells, the HTTP / in-process ratios with their time split, and the batching gains."""
    from serve.toy import IMAGE_SIZE

    print(f"\nquery: {n_images} images ({ns.classes} classes x {ns.per_class}, {IMAGE_SIZE} px PNG, "
          f"{body_bytes / 1024:.0f} KiB JSON), k=10; space {run} ({'given' if ns.space else '1,000 random models'}); "
          f"{os.cpu_count()} CPUs")
    print(f"{'layout':>12} {'batching':>8} {'format':>9} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(f"{r['layout']:>12} {r['batching']:>8} {r['format']:>9} {r['clients']:>7} {r['requests']:>8} "
              f"{r['errors']:>6} {r['p50'] * 1e3:>8.1f} {r['p99'] * 1e3:>8.1f} {r['rps']:>7.1f}")
    for r in rows:
        if r["first_error"]:
            print(f"first error ({r['layout']}, {r['batching']}, {r['format']}, {r['clients']} clients): "
                  f"{r['first_error']}")
    for (layout, mode, fmt), (t_http, t_lib, split) in ratios.items():
        print(f"{layout}, batching {mode}, {fmt}: HTTP p50 {t_http * 1e3:.1f} ms / in-process "
              f"Retriever.retrieve_images p50 "
              f"{t_lib * 1e3:.1f} ms = {t_http / t_lib:.2f}; target <= 1.2 x + 5 ms: "
              f"{'met' if t_http <= 1.2 * t_lib + 0.005 else 'missed'} ({ns.pairs} alternating pairs, 1 client)")
        if split:
            outside = "client" if layout.endswith("/direct") else "proxy+client"  # no proxy on that path
            print("    where the HTTP time went (medians, ms, from Server-Timing): "
                  + ", ".join(f"{outside if k == 'proxy+client' else k} {split[k]:.1f}" for k in SPLIT))
    by = {(r["layout"], r["batching"], r["format"], r["clients"]): r["rps"] for r in rows}
    for layout in layouts:
        for fmt in [*formats, *([f"small{ns.small}"] if ns.small else [])]:
            on, off = by.get((layout, "on", fmt, 16)), by.get((layout, "off", fmt, 16))
            if on and off:
                print(f"{layout}, batching at 16 clients, {fmt}: {on:.1f} / {off:.1f} req/s = {on / off:.2f}x "
                      "(target >= 1.3x)")


def layout_config(layout: str, run: str, root: str, batching: bool) -> dict:
    """serve/config.yaml in ``layout`` (split / fused), one replica per deployment, batching on or off."""
    from serve.deploy import app_config

    if layout == "fused":
        return app_config(space=run, args={"root": root}, fused=True,
                          deployments={"Ingress": {**ONE_REPLICA, "user_config": {"batching": batching}}})
    return app_config(space=run, args={"root": root},
                      deployments={"Encoder": {**ONE_REPLICA, "user_config": {"batching": batching}},
                                   "Index": ONE_REPLICA, "Ingress": ONE_REPLICA})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="at most this long per cell")
    parser.add_argument("--max-requests", type=int, default=120, help="at most this many requests per cell")
    parser.add_argument("--pairs", type=int, default=10, help="alternating HTTP / in-process pairs for the ratio")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--space", default="", help="a trained space URI (default: a tiny random one)")
    parser.add_argument("--formats", default="json,multipart", help="request encodings to measure")
    parser.add_argument("--small", type=int, default=2, help="images per small request (0: skip that cell)")
    parser.add_argument("--layouts", default="split,fused", help="app layouts to measure: split and/or fused")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="also measure each layout on the Ingress replica's own port (no proxy)")
    ns = parser.parse_args(argv)
    formats = [f for f in ns.formats.split(",") if f]
    if not set(formats) <= {"json", "multipart"} or not formats:
        parser.error(f"--formats: json and/or multipart, got {ns.formats!r}")
    layouts = [f for f in ns.layouts.split(",") if f]
    if not set(layouts) <= {"split", "fused"} or not layouts:
        parser.error(f"--layouts: split and/or fused, got {ns.layouts!r}")

    import ray
    from ray import serve

    from serve.args import set_serve_env
    from serve.deploy import apply_config, direct_ingress_urls
    from serve.toy import IMAGE_SIZE, make_toy_space, toy_images
    from tans.data.tasks import encode_png

    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tans-serve-bench-"))
    rows, ratios = [], {}
    try:
        space = ns.space or make_toy_space(str(workdir / "root"), "bench", seed=0, n_tasks=20, per_task=50)
        root, run = space.rstrip("/").rsplit("/spaces/", 1)
        images, labels = toy_images(ns.classes, ns.per_class, size=IMAGE_SIZE, seed=1)
        body = json.dumps({"images": [base64.b64encode(encode_png(im)).decode() for im in images],
                           "labels": labels.tolist(), "k": 10}).encode()
        bodies = {"json": (body, "application/json"), "multipart": multipart_body(images, labels)}
        bodies = {f: bodies[f] for f in formats}
        small = None
        if ns.small:
            n = max(2, ns.small)
            small_labels = np.arange(n) % 2
            small = (json.dumps({"images": [base64.b64encode(encode_png(im)).decode() for im in images[:n]],
                                 "labels": small_labels.tolist(), "k": 10}).encode(), "application/json")
        set_serve_env(direct_ingress=ns.direct_ingress)  # as `tans serve` does: the proxy inherits them
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(workdir / "ray"))
        in_process = ray.remote(num_cpus=0)(InProcess).remote(space, images, labels)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        proxy_url = f"http://127.0.0.1:{port}/v1/retrieve"
        for layout, batching in [(lay, b) for lay in layouts for b in (True, False)]:
            apply_config(layout_config(layout, run, root, batching))  # a new layout redeploys; batching reconfigures
            mode = "on" if batching else "off"
            paths = [(layout, proxy_url)]
            if ns.direct_ingress:
                direct = direct_ingress_urls("127.0.0.1")
                if len(direct) != 1:
                    raise RuntimeError(f"expected one direct-ingress port for the one Ingress replica, got {direct}")
                paths.append((f"{layout}/direct", f"{direct[0]}/v1/retrieve"))
            for label, url in paths:
                for fmt, (data, ctype) in bodies.items():
                    load_cell(url, data, 2, 2.0, 10, ctype)  # warm-up
                    ratios[(label, mode, fmt)] = lockstep_ratio(url, data, in_process, ns.pairs, ctype)
                    for clients in CLIENTS:
                        rows.append({"layout": label, "batching": mode, "format": fmt,
                                     **load_cell(url, data, clients, ns.seconds, ns.max_requests, ctype)})
                if small is not None:
                    rows.append({"layout": label, "batching": mode, "format": f"small{ns.small}",
                                 **load_cell(url, small[0], 16, ns.seconds, ns.max_requests * 4, small[1])})
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    vias = ("", "/direct") if ns.direct_ingress else ("",)
    measured = [layout + via for layout in layouts for via in vias]
    report(ns, rows, ratios, formats, len(labels), len(body), run, measured)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
