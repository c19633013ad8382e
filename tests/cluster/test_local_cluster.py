"""A local multi-node Ray cluster (cluster/local.sh) with an S3 server, all on 127.0.0.1.

* every listener of every process the cluster started is on loopback;
* the tiny zoo build, submitted with ``ray job submit``, measures on more than one node;
* the space and a search, submitted the same way with the root in the bucket, leave the search
  report and the exported winner in the bucket;
* a worker node killed mid-build (its raylet, SIGKILL) loses and duplicates no zoo row;
* an unreachable ``RAY_ADDRESS`` is one line on stderr and exit 1, within seconds.

The job tests run the cluster in a loopback-only network namespace (``TANS_CLUSTER_NETNS=1``):
torch.distributed's TCPStore - the rendezvous of Ray Train's process group during pretraining -
always binds every interface, and no setting changes that; in the namespace there is no other
interface. The listener test runs the cluster as a user would (no namespace), before any job.
Each cluster has its own ports, state dir and bucket; nothing is left running afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
ZOO = "tiny-ofa_mbv3_tiny-32px"
ZOO_TASKS = ["digits_0_5", "digits_5_10", "mnist_0_5", "mnist_5_10"]  # configs/splits/tiny.yaml: meta_train + meta_val
SUBNETS = 4  # configs/zoo/tiny.yaml: measure.subnets_per_task
WORKERS = 2
PORT_SPAN = 100 * (WORKERS + 2)  # cluster/local.sh: BASE .. BASE + 100 * (WORKERS + 2)
UNUSED_OFFSET = 19  # a port in the cluster's block that nothing listens on (see cluster/local.sh)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def netns_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port_block(span: int) -> int:
    """A base port whose whole block [base, base + span) is free on 127.0.0.1 (below the ephemeral range)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 32000 - span)
        socks = []
        try:
            for port in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free block of {span} ports found")


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        table[int(entry)] = (ppid, cmd or stat[stat.find("(") + 1 : stat.rfind(")")])
    return table


def zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat[stat.rfind(")") + 2] == "Z"


def descendants(roots: list[int], table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


class LocalCluster:
    """cluster/local.sh with its own ports, state dir and (optionally) network namespace."""

    def __init__(self, netns: bool):
        # short: Ray's Unix socket paths under <state>/ray/session_*/sockets/ must stay < 108 chars
        self.state = Path(tempfile.mkdtemp(prefix="tlc-", dir="/tmp"))
        self.base = free_port_block(PORT_SPAN)
        self.netns = netns
        self.env = {
            **os.environ,
            "TANS_CLUSTER_DIR": str(self.state),
            "TANS_CLUSTER_PORT_BASE": str(self.base),
            "TANS_CLUSTER_WORKERS": str(WORKERS),
            "TANS_CLUSTER_HEAD_CPUS": "0",  # the head runs the drivers; tasks go to the 1-CPU workers
            "TANS_CLUSTER_WORKER_CPUS": "1",
            "TANS_CLUSTER_NETNS": "1" if netns else "0",
        }
        self.pids: dict[str, int] = {}

    def sh(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(LOCAL_SH), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"cluster/local.sh {' '.join(args[:3])} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def up(self) -> LocalCluster:
        t0 = time.monotonic()
        try:
            proc = self.sh("up", timeout=600)
            print(proc.stdout.strip(), proc.stderr.strip())  # stderr: retried worker starts, if any
        except BaseException:
            self.down()
            raise
        lines = self.sh("pids").stdout.split("\n")
        self.pids = {name: int(pid) for name, pid in (line.split() for line in lines if line)}
        print(f"[cluster] up in {time.monotonic() - t0:.0f}s: {self.pids} (ports {self.base}..{self.base + PORT_SPAN})")
        return self

    def down(self) -> None:
        recorded = set(self.pids.values())
        t0 = time.monotonic()
        proc = self.sh("down", timeout=120, check=False)
        print(f"[cluster] {proc.stdout.strip()} {proc.stderr.strip()} ({time.monotonic() - t0:.0f}s)")
        deadline = time.monotonic() + 15  # killed processes linger as zombies until init reaps them
        while (left := {p for p in (recorded & set(proc_table())) | self.marked() if not zombie(p)}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        shutil.rmtree(self.state, ignore_errors=True)
        assert not left, f"cluster/local.sh down left processes running: {sorted(left)}"

    def marked(self) -> set[int]:
        """Processes that carry this cluster's marker (set by local.sh on every node process)."""
        want = f"TANS_LOCAL_CLUSTER={self.state}".encode()
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if want in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                        found.add(int(entry))
                except OSError:
                    pass
        return found

    def processes(self) -> dict[int, str]:
        """Every process the cluster started: the recorded PIDs' trees plus marked processes."""
        table = proc_table()
        pids = descendants(list(self.pids.values()), table) | self.marked()
        return {pid: table[pid][1] for pid in pids if pid in table}

    def exec(self, *cmd: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a client command with the cluster's environment (inside its namespace)."""
        prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
        return subprocess.run(
            [str(LOCAL_SH), "exec", "--", *prefix, *cmd], cwd=REPO, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def python(self, code: str, timeout: float = 120):
        """Run Python in the cluster's environment; returns the JSON it prints last."""
        proc = self.exec("python", "-c", textwrap.dedent(code), timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def listeners(self) -> list[tuple[str, int, int, str]]:
        """(address, port, pid, process name) of every listening TCP socket the cluster's view shows."""
        proc = self.exec("ss", "-ltnpH", timeout=30)
        assert proc.returncode == 0, proc.stderr
        found = []
        for line in proc.stdout.splitlines():
            fields = line.split()
            addr, _, port = fields[3].rpartition(":")
            users = " ".join(fields[5:])
            for chunk in users.split("(")[2:] or [""]:
                if "pid=" in chunk:
                    name = chunk.split('"')[1] if '"' in chunk else "?"
                    pid = int(chunk.split("pid=")[1].split(",")[0])
                    found.append((addr.strip("[]"), int(port), pid, name))
        return found

    def submit(self, *entrypoint: str, wait: bool = True, submission_id: str | None = None, timeout: float = 600):
        args = ["ray", "job", "submit", "--working-dir", ".", "--runtime-env-json", self.runtime_env]
        if submission_id:
            args += ["--submission-id", submission_id]
        if not wait:
            args.append("--no-wait")
        return self.exec(*args, "--", *entrypoint, timeout=timeout)

    @property
    def runtime_env(self) -> str:
        # excludes from cluster/runtime_env.yaml; the local S3 endpoint and credentials as env_vars
        return self.sh("runtime-env").stdout.strip()

    def job_status(self, submission_id: str) -> str:
        out = self.exec("ray", "job", "status", submission_id, timeout=60).stdout
        # "Job 'x' succeeded" / "Job 'x' failed" / "Job 'x' was stopped" / "Status for job 'x': RUNNING"
        for status, phrase in (("SUCCEEDED", "' succeeded"), ("FAILED", "' failed"), ("STOPPED", "' was stopped")):
            if phrase in out or f"': {status}" in out:
                return status
        for status in ("RUNNING", "PENDING"):
            if f"': {status}" in out:
                return status
        return "UNKNOWN: " + out[-500:]


def assert_loopback_only(cluster: LocalCluster) -> list[tuple[str, int, int, str]]:
    procs = cluster.processes()
    mine = [sock for sock in cluster.listeners() if sock[2] in procs]
    wild = [s for s in mine if s[0] not in LOOPBACK]
    ports = {s[1] for s in mine}
    b = cluster.base
    # not vacuous: GCS, dashboard, S3 and every node's raylet are in the list
    expected = {b, b + 1, b + 3} | {b + 20 + 10 * i for i in range(WORKERS + 1)}
    assert expected <= ports, f"expected listeners missing: {sorted(expected - ports)}"
    assert not wild, "listening on non-loopback addresses:\n" + "\n".join(map(str, wild))
    return mine


# -- a: loopback-only listeners, the cluster as a user runs it --------------------------------


@pytest.mark.timeout(600)
def test_every_listener_of_the_cluster_is_on_loopback():
    t0 = time.monotonic()
    cluster = LocalCluster(netns=False).up()
    try:
        mine = assert_loopback_only(cluster)
        print(f"[a] {len(cluster.processes())} processes, {len(mine)} listening sockets, all on loopback:")
        for addr, port, pid, name in sorted(mine, key=lambda s: s[1]):
            print(f"    {addr}:{port:<6} {name} (pid {pid})")
        status = cluster.sh("status", timeout=60)  # bounded `ray status` with this cluster's token
        assert status.stdout.count(" node_") == WORKERS + 1, status.stdout
    finally:
        cluster.down()
    print(f"[a] took {time.monotonic() - t0:.0f}s")


# -- the job tests share one cluster in a loopback-only network namespace ---------------------


@pytest.fixture(scope="module")
def cluster():
    netns = netns_available()
    if not netns:
        print("[cluster] no network namespaces here (needs root): torch's TCPStore will listen on *:PORT "
              "during pretraining")
    c = LocalCluster(netns=netns).up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def root(cluster):
    """A storage root in the cluster's bucket with the tiny tasks, written by a `jobs.data` Ray job."""
    uri = f"s3://tans/test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    ingest = " && ".join(
        f"python -m jobs.data ingest builtin:{src} --config configs/data/tiny.yaml root={uri}"
        for src in ("digits", "mnist", "clipart_0_9")  # clipart_0_9: the tiny splits' meta_test task
    )
    proc = cluster.submit("sh", "-c", ingest, timeout=300)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"[data] tasks in {uri} ({time.monotonic() - t0:.0f}s)")
    return uri


def zoo_state(cluster: LocalCluster, uri: str) -> dict:
    """What the bucket holds for the zoo: files, parts, rows, ids, build records, temp files."""
    return cluster.python(
        f"""
        import json, pyarrow.parquet as pq
        from tans.storage import Storage
        st = Storage({uri!r})
        zoo = "zoo/{ZOO}"
        files = [f.rsplit("/", 1)[-1] for f in st.list(zoo)] if st.exists(zoo) else []
        rows = []
        for f in sorted(files):
            if f.startswith("part-") and f.endswith(".parquet"):
                table = pq.read_table(st.path(zoo + "/" + f), filesystem=st.fs, columns=["model_id", "task"])
                rows += table.to_pylist()
        build = st.read_json(zoo + "/build.json") if "build.json" in files else None
        temp = [p for p in st.list("", recursive=True) if p.rsplit("/", 1)[-1].startswith(".tmp-")]
        print(json.dumps({{"files": files, "rows": rows, "build": build, "temp": temp}}))
        """
    )


# -- b: the zoo build as a Ray job, spread over the worker nodes ------------------------------


@pytest.mark.timeout(900)
def test_zoo_build_job_measures_on_several_nodes(cluster, root):
    mine = assert_loopback_only(cluster)
    print(f"[b] namespace={cluster.netns}: {len(mine)} listening sockets of the cluster, all on loopback")
    t0 = time.monotonic()
    proc = cluster.submit("python", "-m", "jobs.build_zoo", "--config", "configs/zoo/tiny.yaml", f"root={root}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in proc.stdout, out[-4000:]
    state = zoo_state(cluster, root)
    items = state["build"]["items"]
    nodes = {item["node_id"] for item in items}
    per_node = {n[:8]: sum(i["node_id"] == n for i in items) for n in nodes}
    print(f"[b] build job succeeded in {time.monotonic() - t0:.0f}s; {len(state['rows'])} rows; "
          f"measurement items per node: {per_node}")
    assert len(state["rows"]) == len(ZOO_TASKS) * SUBNETS
    assert {i["task"] for i in state["build"]["items"]} == set(ZOO_TASKS)
    assert len(nodes) >= 2, f"all measurements ran on one node: {state['build']['items']}"


# -- b2: the space and a search as Ray jobs, the report in the bucket ------------------------


SEARCH_TASK = "clipart_0_9"  # configs/splits/tiny.yaml: meta_test, never seen by the zoo or the space


@pytest.mark.timeout(900)
def test_space_and_search_jobs_write_the_report_to_the_bucket(cluster, root):
    t0 = time.monotonic()
    proc = cluster.submit("python", "-m", "jobs.train_space", "--config", "configs/space/tiny.yaml", f"root={root}")
    assert proc.returncode == 0 and "succeeded" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    t_space = time.monotonic() - t0
    proc = cluster.submit("python", "-m", "jobs.search", "--config", "configs/search/tiny.yaml",
                          "--dataset", SEARCH_TASK, "--max-params", "3000000", "--name", "cluster", f"root={root}")
    assert proc.returncode == 0 and "succeeded" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    state = cluster.python(
        f"""
        import json
        from tans.storage import Storage
        st = Storage({root!r})
        run = "searches/cluster"
        report = st.read_json(run + "/report.json")
        model = st.read_json(run + "/model/model.json")
        files = st.list(run)
        print(json.dumps({{"report": report, "model": model, "files": files,
                          "latest": st.read_bytes("spaces/LATEST").decode().strip()}}))
        """
    )
    report, files = state["report"], state["files"]
    print(f"[b2] space job {t_space:.0f}s, search job {time.monotonic() - t0 - t_space:.0f}s; "
          f"winner {report['winner']['model_id']} test {report['winner']['test_accuracy']:.3f}; files {files}")
    assert state["latest"], "the space job did not publish spaces/LATEST in the bucket"
    assert report["dataset"]["task"] == SEARCH_TASK
    assert {f"searches/cluster/{name}" for name in ("report.json", "report.md", "report.png", "model", "tune")} <= set(
        files)
    finished = [c for c in report["candidates"] if c["status"] == "finished"]
    assert finished and report["winner"]["val_accuracy"] == max(c["val_accuracy"] for c in finished)
    assert report["winner"]["measured"]["n_params"] <= 3_000_000
    assert state["model"]["extra"]["model_id"] == report["winner"]["model_id"]
    assert {"scratch", "generic", "random", "logme"} <= set(report["baselines"])


# -- c: a worker node dies mid-build ----------------------------------------------------------


@pytest.mark.timeout(900)
def test_worker_node_killed_mid_build_loses_no_rows(cluster, root):
    # Start over from the base supernet of test b: the fine-tunes and all zoo parts are gone.
    cluster.python(
        f"""
        from tans.storage import Storage
        st = Storage({root!r})
        st.delete("zoo/{ZOO}")
        st.delete("supernets/{ZOO}/tasks")
        print("{{}}")
        """
    )
    t0 = time.monotonic()
    job = f"fault-{uuid.uuid4().hex[:8]}"
    proc = cluster.submit("python", "-m", "jobs.build_zoo", "--config", "configs/zoo/tiny.yaml", f"root={root}",
                          wait=False, submission_id=job)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    # Wait (inside the cluster's network) until some but not all parts exist.
    before = cluster.python(
        f"""
        import json, time, pyarrow.parquet as pq
        from tans.storage import Storage
        st = Storage({root!r})
        zoo = "zoo/{ZOO}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            parts = [p for p in (st.list(zoo) if st.exists(zoo) else []) if p.endswith(".parquet")]
            if parts:
                rows = sum(pq.ParquetFile(st.fs.open_input_file(st.path(p))).metadata.num_rows for p in parts)
                print(json.dumps({{"parts": len(parts), "rows": rows}}))
                break
            time.sleep(0.3)
        else:
            print(json.dumps({{"parts": 0, "rows": 0}}))
        """,
        timeout=360,
    )
    assert 0 < before["parts"] < len(ZOO_TASKS), f"no window to kill a node in: {before}"

    # The victim: a worker node that is running a zoo work item right now (else worker1).
    table = proc_table()
    busy = {}
    for i in range(1, WORKERS + 1):
        tree = descendants([cluster.pids[f"worker{i}"]], table)
        busy[f"worker{i}"] = [table[p][1].split()[0] for p in tree
                              if table[p][1].startswith(("ray::finetune_task", "ray::measure_items"))]
    victim = next((w for w, items in busy.items() if items), "worker1")
    tree = descendants([cluster.pids[victim]], table)
    (raylet,) = [p for p in tree if table[p][1].split()[0].endswith("/raylet")]
    os.kill(raylet, signal.SIGKILL)
    print(f"[c] {before['parts']}/{len(ZOO_TASKS)} parts, {before['rows']} rows written; killed the raylet of "
          f"{victim} (pid {raylet}; node busy with {busy[victim] or 'nothing'}) at {time.monotonic() - t0:.0f}s")

    # The job goes on with the remaining worker; if it failed anyway, a resubmission resumes it.
    cluster.exec("ray", "job", "logs", "--follow", job, timeout=600)
    status = cluster.job_status(job)
    deadline = time.monotonic() + 60
    while status in ("RUNNING", "PENDING") and time.monotonic() < deadline:
        time.sleep(2)
        status = cluster.job_status(job)
    print(f"[c] job {job}: {status} at {time.monotonic() - t0:.0f}s")
    if status != "SUCCEEDED":
        proc = cluster.submit("python", "-m", "jobs.build_zoo", "--config", "configs/zoo/tiny.yaml", f"root={root}")
        assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
        print(f"[c] resubmitted: succeeded at {time.monotonic() - t0:.0f}s")
    assert not cluster.sh("status", timeout=60, check=False).stdout.count(f"{victim}: running")

    after = zoo_state(cluster, root)
    ids = [r["model_id"] for r in after["rows"]]
    print(f"[c] rows before the kill {before['rows']}, after {len(ids)} ({len(set(ids))} distinct); "
          f"files {sorted(after['files'])}")
    assert len(ids) == len(ZOO_TASKS) * SUBNETS and len(set(ids)) == len(ids)
    assert sorted(r["task"] for r in after["rows"]) == sorted(t for t in ZOO_TASKS for _ in range(SUBNETS))
    assert sorted(after["files"]) == sorted(["build.json", "zoo.json", *(f"part-{t}.parquet" for t in ZOO_TASKS)])
    assert not after["temp"], f"temporary files left: {after['temp']}"


# -- d: a bad RAY_ADDRESS ---------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_unreachable_ray_address_is_one_line_and_exit_1(cluster, root):
    closed = f"127.0.0.1:{cluster.base + UNUSED_OFFSET}"
    t0 = time.monotonic()
    proc = cluster.exec("python", "-m", "jobs.build_zoo", "--config", "configs/zoo/tiny.yaml", f"root={root}",
                        env={"RAY_ADDRESS": closed}, timeout=120)
    took = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    print(f"[d] exit {proc.returncode} in {took:.1f}s: {proc.stderr.strip()}")
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"RAY_ADDRESS={closed}" in lines[0], proc.stderr
    assert took < 90  # the probe itself gives up after 5 s; the rest is importing torch on a busy machine
