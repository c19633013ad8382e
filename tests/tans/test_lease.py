"""One writer per run: two OS processes racing for a lease, takeover after SIGKILL and after a
stale heartbeat, a lost lease noticed - on local disk and on the test S3 server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tans.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost
from tans.storage import Storage
from tests.conftest import REPO

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.s3)]

RACER = """
import sys, time
from tans.lease import Lease, LeaseHeld
from tans.storage import Storage
root, run, go, hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
st = Storage(root)
while time.time() < go:
    pass
try:
    with Lease(st, run, what="race", ttl_s=30):
        print("WON", flush=True)
        time.sleep(hold)
except LeaseHeld as exc:
    print("HELD", exc, flush=True)
"""


@pytest.fixture(params=BACKENDS)
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), {}
    server = request.getfixturevalue("s3_env")
    bucket = server.make_bucket(f"lease-{uuid.uuid4().hex[:8]}")
    return f"s3://{bucket}/prefix", server.env()


def _racers(root: str, env: dict, run: str, n: int = 2, hold: float = 2.0) -> list[subprocess.Popen]:
    go = time.time() + 4.0  # both processes are imported and spinning by then
    return [subprocess.Popen([sys.executable, "-c", RACER, root, run, str(go), str(hold)], cwd=REPO,
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(n)]


@pytest.mark.timeout(240)
def test_two_processes_racing_for_a_run_exactly_one_wins(root, ledger):
    uri, env = root
    for round_ in range(3):
        ledger.fault()
        procs = _racers(uri, env, f"spaces/r{round_}")
        outs = [p.communicate(timeout=60) for p in procs]
        lines = [o.strip() for o, _ in outs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
        assert sorted(line.split()[0] for line in lines) == ["HELD", "WON"], lines
        held = next(line for line in lines if line.startswith("HELD"))
        assert "being written by pid" in held and socket.gethostname() in held and "(race)" in held
        assert not Storage(uri).exists(f"spaces/r{round_}/{LEASE_FILE}")  # released by the winner


@pytest.mark.timeout(240)
def test_a_lease_whose_owner_was_killed_is_taken_over(root, monkeypatch, ledger):
    ledger.fault()
    uri, env = root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (holder,) = _racers(uri, env, "searches/s", n=1, hold=120)
    try:
        assert holder.stdout.readline().strip() == "WON"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on"):
            Lease(Storage(uri), "searches/s").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with Lease(Storage(uri), "searches/s", what="second") as lease:
        assert lease.took_over["pid"] == holder.pid and "gone" in lease.took_over["reason"]
        lease.check()
    assert not Storage(uri).exists(f"searches/s/{LEASE_FILE}")


def _plant(st: Storage, run: str, host: str, age_s: float, ttl_s: float = 30.0) -> None:
    st.write_json(f"{run}/{LEASE_FILE}", {"host": host, "pid": 4242, "token": "t", "what": "x",
                                          "since": time.time() - age_s, "heartbeat": time.time() - age_s,
                                          "ttl_s": ttl_s})


@pytest.mark.timeout(120)
def test_an_owner_elsewhere_keeps_its_lease_until_its_heartbeat_expires(root, monkeypatch, ledger):
    ledger.fault(3)
    uri, env = root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st = Storage(uri)
    _plant(st, "evaluations/e", "elsewhere", age_s=5)
    with pytest.raises(LeaseHeld, match="pid 4242 on elsewhere"):
        Lease(st, "evaluations/e").acquire()
    _plant(st, "evaluations/e", "elsewhere", age_s=100)
    with Lease(st, "evaluations/e") as lease:
        assert "heartbeat is 100s old" in lease.took_over["reason"]
    st.write_bytes(f"evaluations/e/{LEASE_FILE}", b"\x00garbage")  # a damaged lease is nobody's
    with Lease(st, "evaluations/e") as lease:
        assert lease.took_over["reason"] == "unreadable lease"


@pytest.mark.timeout(120)
def test_a_holder_notices_when_its_lease_is_taken(root, monkeypatch, ledger):
    ledger.fault()
    uri, env = root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st = Storage(uri)
    lease = Lease(st, "zoo/z", ttl_s=0.4).acquire()
    # as if a server had ignored a condition: someone else's lease replaces ours
    _plant(st, "zoo/z", "elsewhere", age_s=0)
    deadline = time.monotonic() + 10
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    with pytest.raises(LeaseLost, match="took this run over"):
        lease.check()
    lease.release()
    assert json.loads(st.read_bytes(f"zoo/z/{LEASE_FILE}"))["host"] == "elsewhere"  # not ours to delete


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_the_test_s3_server_enforces_conditional_writes(s3_env):
    """The S3 lease relies on If-None-Match / If-Match; this server honours both."""
    client = s3_env.client
    bucket = s3_env.make_bucket(f"cond-{uuid.uuid4().hex[:8]}")
    client.put_object(Bucket=bucket, Key="k", Body=b"a", IfNoneMatch="*")
    with pytest.raises(Exception, match="PreconditionFailed|pre-conditions"):
        client.put_object(Bucket=bucket, Key="k", Body=b"b", IfNoneMatch="*")
    with pytest.raises(Exception, match="PreconditionFailed|pre-conditions"):
        client.put_object(Bucket=bucket, Key="k", Body=b"c", IfMatch='"0000"')
    etag = client.head_object(Bucket=bucket, Key="k")["ETag"]
    client.put_object(Bucket=bucket, Key="k", Body=b"d", IfMatch=etag)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"d"
