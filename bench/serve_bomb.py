"""A pixel bomb against the Serve app: 2,000 solid-colour 1024x1024 PNGs in one legal-sized request.

    python bench/serve_bomb.py [--images 2000] [--side 1024] [--legal 40] [--space URI]

The body is ~14 MB of JSON (under the 32 MB body limit) that would decode to 6 GiB of RGB pixels.
The service must answer 413 from the image headers (the decoded-pixel budget,
``max_pixels_per_request``, 64 M by default) without decoding any image, and /v1/healthz must keep
answering in under 1 s meanwhile: a thread polls it every 50 ms while the bomb is in flight. The
bomb is sent as JSON and as multipart; then a legal query of ``--legal`` 1024x1024 images (within
the budget) shows the same service still decodes, resizes and answers (200).

Starts a local Ray and Serve on 127.0.0.1 (a free port) and deploys serve/config.yaml with one
replica per deployment over a tiny random space (serve/toy.py; or ``--space``), the way
bench/serve_load.py does; everything is shut down at the end. Prints one summary line last; exit
status 1 if the bomb was not refused with 413 or a health probe took 1 s or more.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # an embedded Ray on loopback

import requests

ONE_REPLICA = {"num_replicas": 1, "autoscaling_config": None}
HEALTH_LIMIT_S = 1.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def solid_pngs(n: int, side: int, colours: int = 64) -> list[bytes]:
    """``n`` solid-colour ``side`` x ``side`` PNGs (``colours`` distinct ones, cycled: encoding each is slow)."""
    from PIL import Image

    distinct = []
    for i in range(min(n, colours)):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)).save(buf, format="PNG")
        distinct.append(buf.getvalue())
    return [distinct[i % len(distinct)] for i in range(n)]


class HealthPoller:
    """Polls /v1/healthz every ``interval_s`` from a thread; records each probe's latency and status."""

    def __init__(self, url: str, interval_s: float = 0.05):
        self.url, self.interval_s = url, interval_s
        self.latencies: list[float] = []
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = s.get(self.url, timeout=30)
                    if r.status_code != 200:
                        self.bad.append(f"{r.status_code} {r.text[:100]}")
                except requests.RequestException as exc:
                    self.bad.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - t0)
                self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def max_s(self) -> float:
        return max(self.latencies, default=float("nan"))


def send(url: str, health_url: str, **kwargs) -> dict:
    """One request with health probes running throughout: status, seconds, error text, probe stats."""
    with HealthPoller(health_url) as poller:
        time.sleep(0.2)  # a few probes before, as a baseline
        t0 = time.perf_counter()
        r = requests.post(url, timeout=300, **kwargs)
        seconds = time.perf_counter() - t0
        time.sleep(0.1)
    error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
    return {"status": r.status_code, "seconds": seconds, "error": error, "probes": len(poller.latencies),
            "health_max_s": poller.max_s, "health_bad": poller.bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the bomb")
    parser.add_argument("--side", type=int, default=1024, help="their side in pixels")
    parser.add_argument("--legal", type=int, default=40, help="images in the legal query sent afterwards (0: none)")
    parser.add_argument("--space", default="", help="a trained space URI (default: a tiny random one)")
    ns = parser.parse_args(argv)

    import ray
    from ray import serve

    from serve.args import AppArgs
    from serve.deploy import app_config, apply_config
    from serve.toy import make_toy_space

    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tans-serve-bomb-"))
    results: dict[str, dict] = {}
    try:
        pngs = solid_pngs(ns.images, ns.side)
        labels = [i % 10 for i in range(ns.images)]
        body = json.dumps({"images": [base64.b64encode(p).decode() for p in pngs], "labels": labels}).encode()
        files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
        space = ns.space or make_toy_space(str(workdir / "root"), "bomb", seed=0, n_tasks=5, per_task=10)
        root, run = space.rstrip("/").rsplit("/spaces/", 1)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(workdir / "ray"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apply_config(app_config(space=run, args={"root": root},
                                deployments={"Encoder": ONE_REPLICA, "Index": ONE_REPLICA, "Ingress": ONE_REPLICA}))
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/v1/healthz", timeout=60).status_code == 200
        url, health = f"{base}/v1/retrieve", f"{base}/v1/healthz"
        results["json"] = send(url, health, data=body, headers={"content-type": "application/json"})
        results["multipart"] = send(url, health, files=files, data={"labels": ",".join(map(str, labels))})
        if ns.legal:
            legal = solid_pngs(ns.legal, ns.side)
            results["legal"] = send(url, health, json={
                "images": [base64.b64encode(p).decode() for p in legal], "labels": [i % 4 for i in range(ns.legal)]})
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    budget = AppArgs().max_pixels_per_request
    pixels = ns.images * ns.side * ns.side
    print(f"\nbomb: {ns.images} solid-colour {ns.side}x{ns.side} PNGs, {len(body) / 1e6:.1f} MB of JSON, "
          f"{pixels:,} pixels = {pixels * 3 / 2**30:.1f} GiB of RGB if decoded; budget {budget:,} pixels; "
          f"{os.cpu_count()} CPUs")
    for name, r in results.items():
        print(
            f"{name:>9}: HTTP {r['status']} in {r['seconds']:.2f} s; /v1/healthz max {r['health_max_s'] * 1e3:.0f} ms "
            f"over {r['probes']} probes{', failures: ' + str(r['health_bad'][:3]) if r['health_bad'] else ''}"
            f"{'; ' + r['error'] if r['error'] else ''}"
        )
    bombs_ok = all(results[k]["status"] == 413 for k in ("json", "multipart"))
    legal_ok = "legal" not in results or results["legal"]["status"] == 200
    health_max = max(r["health_max_s"] for r in results.values())
    health_ok = health_max < HEALTH_LIMIT_S and not any(r["health_bad"] for r in results.values())
    ok = bombs_ok and legal_ok and health_ok
    legal = (f"; legal {ns.legal}-image query {results['legal']['status']} in {results['legal']['seconds']:.2f} s"
             if "legal" in results else "")
    print(f"summary: {'PASS' if ok else 'FAIL'}: bomb -> {results['json']['status']} (JSON) in "
          f"{results['json']['seconds']:.2f} s, {results['multipart']['status']} (multipart) in "
          f"{results['multipart']['seconds']:.2f} s; /v1/healthz max {health_max * 1e3:.0f} ms while in flight "
          f"({'under' if health_ok else 'NOT under'} {HEALTH_LIMIT_S:g} s){legal}; total "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
