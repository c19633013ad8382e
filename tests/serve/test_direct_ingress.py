"""`tans serve --direct-ingress`: the Ingress replica answers HTTP itself, on loopback, with the
proxy's answers, and Ctrl-C still stops everything; a Ray that is already running is refused."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from tests.conftest import REPO, free_port, run_cli


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def _query_body() -> bytes:
    from serve.toy import IMAGE_SIZE, toy_images
    from tans.data.tasks import encode_png

    images, labels = toy_images(2, 3, size=IMAGE_SIZE, seed=3)
    return json.dumps({"images": [base64.b64encode(encode_png(im)).decode() for im in images],
                       "labels": labels.tolist(), "k": 5}).encode()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_direct_ingress_answers_like_the_proxy_on_loopback(tmp_path):
    from serve.toy import make_toy_space

    make_toy_space(str(tmp_path / "root"), "runA", seed=0, n_tasks=3, per_task=4, embed_dim=8)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--root", str(tmp_path / "root"),
                             "--port", str(port), "--fused", "--direct-ingress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        direct = None
        deadline = time.monotonic() + 200
        while direct is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"direct ingress \(no proxy hop\): (http://\S+)/v1/retrieve", line)
            direct = found.group(1) if found else None
        assert direct is not None, "".join(lines[-30:])
        host, direct_port = direct.removeprefix("http://").rsplit(":", 1)
        assert host == "127.0.0.1" and int(direct_port) != port
        # the replica's own server listens on loopback only, like the proxy
        assert _listening_addresses(int(direct_port)) == {"0100007F"}

        body = _query_body()
        headers = {"content-type": "application/json"}
        via_proxy = requests.post(f"http://127.0.0.1:{port}/v1/retrieve", data=body, headers=headers, timeout=60)
        via_replica = requests.post(f"{direct}/v1/retrieve", data=body, headers=headers, timeout=60)
        assert via_proxy.status_code == 200 and via_replica.status_code == 200, (via_proxy.text, via_replica.text)
        proxied, straight = via_proxy.json(), via_replica.json()
        assert [c["model_id"] for c in straight["candidates"]] == [c["model_id"] for c in proxied["candidates"]]
        assert np.allclose([c["similarity"] for c in straight["candidates"]],
                           [c["similarity"] for c in proxied["candidates"]])
        # the same app behind both: its errors and its timing header too
        bad = requests.post(f"{direct}/v1/retrieve", data=b"{not json", headers=headers, timeout=60)
        assert bad.status_code in (400, 422) and "Server-Timing" in via_replica.headers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, "".join(lines[-30:]) + rest[-3000:]
    assert "shutting down" in rest


def test_direct_ingress_on_a_running_ray_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("serve", "--root", str(tmp_path), "--direct-ingress", env={"RAY_ADDRESS": "127.0.0.1:1"},
                   timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in lines[0], proc.stderr
