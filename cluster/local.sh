#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1 - a head and N worker nodes, each its own
# `ray start --block` process with its own ports and resources - plus a throwaway S3 server
# (SeaweedFS `weed mini`), for trying `ray job submit` and for tests/cluster/:
#
#   cluster/local.sh up            start everything, wait until all nodes joined and S3 answers
#   cluster/local.sh status        which processes run; `ray status` (bounded by a timeout)
#   cluster/local.sh env           the exports a client shell needs:  eval "$(cluster/local.sh env)"
#   cluster/local.sh runtime-env   JSON for `ray job submit --runtime-env-json` (excludes, S3 env vars)
#   cluster/local.sh exec -- CMD   run CMD with that environment (inside the namespace, see NETNS)
#   cluster/local.sh pids          the recorded PIDs, one "name pid" per line
#   cluster/local.sh down          stop exactly what `up` started
#
# Loopback only. Ray rewrites a 127.0.0.1 node address to the machine's public IP - and then
# binds its gRPC servers to every interface - unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; that
# flag also makes `ray start --address` (a worker node) refuse to run. So every node runs with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and --node-ip-address=127.0.0.1 (head: also
# --dashboard-host=127.0.0.1), and a worker node is the real `ray start` CLI with that one
# refusal switched off in its own process (see WORKER_START below). Every port is explicit.
# Every node has its own --temp-dir, as separate machines would: nodes sharing a session dir
# race for socket names and re-extract each other's job working dirs (runtime_resources/)
# under running drivers.
#
# Token auth (Ray 2.60's default) uses this cluster's own token, $STATE/auth_token
# (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH); clients need both (`env` prints them).
#
# NETNS=1 (TANS_CLUSTER_NETNS=1, needs root or CAP_SYS_ADMIN): every process also runs in a fresh
# network namespace that has only a loopback interface, so not even a listener Ray cannot
# configure (torch.distributed's TCPStore, used by Ray Train, binds all interfaces) is reachable
# from outside, and nothing can reach out. Clients must then run inside it: `cluster/local.sh exec`.
#
# Each process starts in its own session (setsid) and its PID is recorded in $STATE; all of them
# carry TANS_LOCAL_CLUSTER=$STATE in their environment, so `down` also finds what they started
# in other sessions (Ray job drivers). Never `ray stop`: it stops every Ray on the machine.
# Worker nodes start one after the other; a start that dies is retried twice (on a loaded machine
# a raylet can abort when its dashboard agent takes over 15 s to report its ports).
#
# Settings (environment; `up` saves them in $STATE/cluster.env, which later commands read):
#   TANS_CLUSTER_DIR          state dir (PIDs, logs, Ray temp dir, S3 data)  [/tmp/tans-local-cluster]
#   TANS_CLUSTER_PORT_BASE    first port; the cluster uses BASE .. BASE+100*(WORKERS+2)  [26400]
#   TANS_CLUSTER_GCS_PORT / _DASHBOARD_PORT / _S3_PORT   override single ports [BASE, +1, +3]
#   TANS_CLUSTER_WORKERS      worker nodes [2]
#   TANS_CLUSTER_HEAD_CPUS    CPUs of the head [0: it only runs drivers]
#   TANS_CLUSTER_WORKER_CPUS  CPUs of each worker node [1]
#   TANS_CLUSTER_OBJECT_STORE_MB  object store per node [256]
#   TANS_CLUSTER_BUCKET / TANS_CLUSTER_PREFIX   storage root s3://BUCKET/PREFIX [tans / tans]
#   TANS_CLUSTER_NETNS        1: run in a loopback-only network namespace [0]
#   TANS_VENV                 the virtualenv whose ray/python/weed to use [.venv]
set -Eeuo pipefail
cd "$(dirname "$0")/.."

STATE=${TANS_CLUSTER_DIR:-/tmp/tans-local-cluster}
STATE=$(mkdir -p "$STATE" && cd "$STATE" && pwd)
if [ -f "$STATE/cluster.env" ]; then
    # shellcheck source=/dev/null
    . "$STATE/cluster.env"  # what is running wins over the current environment
else
    BASE=${TANS_CLUSTER_PORT_BASE:-26400}
    GCS_PORT=${TANS_CLUSTER_GCS_PORT:-$BASE}
    DASH_PORT=${TANS_CLUSTER_DASHBOARD_PORT:-$((BASE + 1))}
    CLIENT_PORT=$((BASE + 2))
    S3_PORT=${TANS_CLUSTER_S3_PORT:-$((BASE + 3))}
    WORKERS=${TANS_CLUSTER_WORKERS:-2}
    HEAD_CPUS=${TANS_CLUSTER_HEAD_CPUS:-0}
    WORKER_CPUS=${TANS_CLUSTER_WORKER_CPUS:-1}
    OBJECT_STORE_MB=${TANS_CLUSTER_OBJECT_STORE_MB:-256}
    BUCKET=${TANS_CLUSTER_BUCKET:-tans}
    PREFIX=${TANS_CLUSTER_PREFIX:-tans}
    NETNS=${TANS_CLUSTER_NETNS:-0}
    VENV=$(cd "${TANS_VENV:-.venv}" && pwd)
    S3_KEY="" S3_SECRET=""
fi
BIN=$VENV/bin

# The real `ray start` CLI for a worker node. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (in the
# environment, inherited by the raylet, agents and workers) keeps 127.0.0.1 as the node address;
# in this process alone the flag is turned back on, so that `ray start --address` does not refuse
# to add a node, and this node's address "as the cluster sees it" is 127.0.0.1 - which also keeps
# Ray from rewriting 127.0.0.1 to the public IP and from probing 8.8.8.8 to find one.
WORKER_START='
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
ray_constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
'

save_config() {
    umask 077
    cat >"$STATE/cluster.env" <<EOF
BASE=$BASE GCS_PORT=$GCS_PORT DASH_PORT=$DASH_PORT CLIENT_PORT=$CLIENT_PORT S3_PORT=$S3_PORT
WORKERS=$WORKERS HEAD_CPUS=$HEAD_CPUS WORKER_CPUS=$WORKER_CPUS OBJECT_STORE_MB=$OBJECT_STORE_MB
BUCKET=$BUCKET PREFIX=$PREFIX NETNS=$NETNS VENV=$VENV
S3_KEY=$S3_KEY S3_SECRET=$S3_SECRET
EOF
}

node_ports() {  # node index (0 = head) -> its own ports
    local b=$((BASE + 20 + 10 * $1)) w=$((BASE + 100 + 100 * $1))
    echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --dashboard-agent-listen-port=$((b + 2))" \
        "--dashboard-agent-grpc-port=$((b + 3)) --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5))" \
        "--min-worker-port=$w --max-worker-port=$((w + 99))"
}

pid_of() { cat "$STATE/$1.pid" 2>/dev/null || true; }
running() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }  # zombies are gone
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && running "$p"; }
names() { echo s3 head; for i in $(seq 1 "$WORKERS"); do echo "worker$i"; done; }

in_ns() {  # run a command in the cluster's network namespace (or as is)
    if [ "$NETNS" = 1 ]; then
        nsenter --net="/proc/$(pid_of netns)/ns/net" -- "$@"
    else
        "$@"
    fi
}

node_env() {  # the environment of every cluster process, as an `env` command line in NODE_ENV
    NODE_ENV=(env -u RAY_ADDRESS -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE
        -u AWS_ENDPOINT_URL -u AWS_ENDPOINT_URL_S3 -u TANS_S3_ENDPOINT
        PATH="$BIN:$PATH" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
        RAY_AUTH_TOKEN_PATH="$STATE/auth_token" AWS_EC2_METADATA_DISABLED=true
        AUTOSCALER_METRIC_PORT=$((BASE + 16)) DASHBOARD_METRIC_PORT=$((BASE + 17))
        NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost TANS_LOCAL_CLUSTER="$STATE")
}

start_bg() {  # name command... : start it in a new session (in the namespace), record its PID
    local name=$1 pid sid
    shift
    node_env
    set -- "${NODE_ENV[@]}" "$@"
    if [ "$NETNS" = 1 ]; then
        set -- nsenter --net="/proc/$(pid_of netns)/ns/net" -- "$@"
    fi
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    pid=$!
    disown "$pid"
    sid=$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
    if [ -n "$sid" ] && [ "$sid" != "$pid" ]; then  # setsid forked (job control on): take its child
        sleep 0.2
        pid=$(pgrep -s "$pid" -o 2>/dev/null || echo "$pid")
    fi
    echo "$pid" >"$STATE/$name.pid"
}

client_env() {  # exports for a client shell
    cat <<EOF
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export TANS_ROOT=s3://$BUCKET/$PREFIX
EOF
    if [ "$NETNS" = 1 ]; then
        echo "# NETNS=1: the cluster is only reachable inside its namespace: cluster/local.sh exec -- <command>"
    fi
}

runtime_env_json() {  # cluster/runtime_env.yaml's excludes + this cluster's S3 settings
    S3_PORT=$S3_PORT S3_KEY=$S3_KEY S3_SECRET=$S3_SECRET ROOT="s3://$BUCKET/$PREFIX" "$BIN/python" - <<'EOF'
import json, os, yaml
doc = yaml.safe_load(open("cluster/runtime_env.yaml"))
excludes = list(dict.fromkeys([*doc.get("excludes", []), ".ruff_cache/", "*.egg-info/", ".devrun/"]))
env = {**doc.get("env_vars", {}),
       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{os.environ['S3_PORT']}",
       "AWS_ACCESS_KEY_ID": os.environ["S3_KEY"], "AWS_SECRET_ACCESS_KEY": os.environ["S3_SECRET"],
       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "TANS_ROOT": os.environ["ROOT"]}
print(json.dumps({"excludes": excludes, "env_vars": env}))
EOF
}

ray_status() {  # bounded: a wrong address or token must not hang
    in_ns env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" \
        RAY_USAGE_STATS_ENABLED=0 timeout "${1:-20}" "$BIN/ray" status --address="127.0.0.1:$GCS_PORT"
}

wait_until() {  # what seconds command... : poll until the command succeeds
    local what=$1 secs=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - t0)) -ge "$secs" ]; then
            echo "error: $what not ready within ${secs}s (logs in $STATE)" >&2
            return 1
        fi
        sleep 1
    done
}

s3_ready() {
    in_ns env AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_EC2_METADATA_DISABLED=true \
        "$BIN/python" -c "import boto3; from botocore.config import Config; boto3.client('s3', \
endpoint_url='http://127.0.0.1:$S3_PORT', region_name='us-east-1', config=Config(connect_timeout=2, \
read_timeout=5, retries={'max_attempts': 1})).head_bucket(Bucket='$BUCKET')"
}

started() {  # name: its `ray start` is up (or fail fast if it died)
    if ! alive "$1"; then
        echo "error: $1 exited during start (see $STATE/$1.log); stopping what was started" >&2
        down >&2
        exit 1
    fi
    grep -q "Ray runtime started" "$STATE/$1.log"
}

start_worker() {  # i: start worker node i, wait until it runs; a start that dies (Ray gives a
    # raylet 30 s to register, which a loaded machine can miss) is retried twice
    local i=$1 attempt t0
    for attempt in 1 2 3; do
        start_bg "worker$i" "$BIN/python" -c "$WORKER_START" start --block \
            --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
            --resources="{\"worker$i\": 1}" --object-store-memory=$((OBJECT_STORE_MB * 1048576)) \
            --temp-dir="$STATE/ray$i" --disable-usage-stats $(node_ports "$i")
        t0=$SECONDS
        while [ $((SECONDS - t0)) -lt 120 ] && alive "worker$i"; do
            if grep -q "Ray runtime started" "$STATE/worker$i.log"; then return 0; fi
            sleep 1
        done
        echo "worker node $i did not start (attempt $attempt, log in $STATE/worker$i.attempt$attempt.log)" >&2
        kill -KILL -- "-$(pid_of "worker$i")" 2>/dev/null || true
        cp "$STATE/worker$i.log" "$STATE/worker$i.attempt$attempt.log"
    done
    return 1
}

nodes_joined() { [ "$(ray_status 15 | grep -c '^ 1 node_')" -eq $((WORKERS + 1)) ]; }

up() {
    if alive head || alive s3; then
        echo "already up (state in $STATE; cluster/local.sh down first)"
        return 0
    fi
    rm -f "$STATE"/*.pid "$STATE/cluster.env"
    local span=$((100 * (WORKERS + 2)))
    if [ $((BASE + span)) -gt 65535 ]; then
        echo "error: ports $BASE..$((BASE + span)) do not fit below 65536" >&2
        return 2
    fi
    S3_KEY=local-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(8))')
    S3_SECRET=$("$BIN/python" -c 'import secrets; print(secrets.token_hex(20))')
    save_config
    (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$STATE/auth_token")
    trap 'trap - ERR; echo "up failed; stopping what was started" >&2; down >&2' ERR

    if [ "$NETNS" = 1 ]; then
        if ! unshare -n true 2>/dev/null; then
            echo "error: NETNS=1 needs unshare -n (root or CAP_SYS_ADMIN)" >&2
            return 2
        fi
        setsid unshare -n sh -c 'ip link set lo up 2>/dev/null || ifconfig lo up; exec sleep infinity' \
            >"$STATE/netns.log" 2>&1 </dev/null &
        echo $! >"$STATE/netns.pid"
        disown $!
        wait_until "the network namespace" 10 in_ns sh -c 'ip -o addr show lo 2>/dev/null | grep -q 127.0.0.1'
    fi

    # S3: every port explicit and on 127.0.0.1; no telemetry; no admin UI, WebDAV, Iceberg or Lance.
    cat >"$STATE/s3.json" <<EOF
{"identities":[{"name":"tans","credentials":[{"accessKey":"$S3_KEY","secretKey":"$S3_SECRET"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
    local s=$((BASE + 4))
    start_bg s3 "$BIN/weed" mini -dir="$STATE/s3-data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -metricsIp=127.0.0.1 \
        -master.port="$s" -master.port.grpc=$((s + 1)) -volume.port=$((s + 2)) -volume.port.grpc=$((s + 3)) \
        -filer.port=$((s + 4)) -filer.port.grpc=$((s + 5)) -admin.port=$((s + 6)) -admin.port.grpc=$((s + 7)) \
        -s3.port="$S3_PORT" -s3.port.grpc=$((s + 8)) -s3.metricsIp=127.0.0.1 -s3.metricsPort=$((s + 9)) \
        -metricsPort=$((s + 10)) -debug.port=$((s + 11)) -s3.port.iceberg=0 -s3.port.lance=0 -admin.ui=false \
        -webdav=false -master.telemetry=false -bucket="$BUCKET" -s3.config="$STATE/s3.json" \
        -filer.localSocket="$STATE/filer.sock" -s3.localSocket="$STATE/s3.sock"

    # Head: the GCS, dashboard and job API; it runs the job drivers and, by default, no tasks.
    start_bg head "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --num-cpus="$HEAD_CPUS" --resources='{"head": 1}' --object-store-memory=$((OBJECT_STORE_MB * 1048576)) \
        --temp-dir="$STATE/ray" --disable-usage-stats $(node_ports 0)
    wait_until "the Ray head" 90 started head
    local i
    for i in $(seq 1 "$WORKERS"); do
        start_worker "$i"
    done
    wait_until "the S3 server" 60 s3_ready
    wait_until "$((WORKERS + 1)) Ray nodes" 90 nodes_joined
    trap - ERR
    echo "up: head + $WORKERS worker nodes (GCS 127.0.0.1:$GCS_PORT, dashboard http://127.0.0.1:$DASH_PORT)," \
        "S3 http://127.0.0.1:$S3_PORT (bucket $BUCKET)$([ "$NETNS" = 1 ] && echo ', in a loopback-only network namespace')"
    echo "use it:  eval \"\$(cluster/local.sh env)\"   stop it:  cluster/local.sh down"
}

marked_pids() {  # every process that carries this cluster's marker (job drivers included)
    local f
    grep -lzxF "TANS_LOCAL_CLUSTER=$STATE" /proc/[0-9]*/environ 2>/dev/null | while read -r f; do
        f=${f#/proc/}
        echo "${f%/environ}"
    done
}

group_pids() { [ -n "$1" ] && pgrep -g "$1" 2>/dev/null || true; }

down() {
    trap - ERR
    local any=0 name p t0 rest
    # Each node's `ray start --block` shuts its own processes down on SIGTERM (workers drain first).
    for name in $(names); do
        p=$(pid_of "$name")
        if [ "$name" != s3 ] && [ -n "$p" ]; then any=1; kill -TERM "$p" 2>/dev/null || true; fi
    done
    t0=$SECONDS
    while [ $((SECONDS - t0)) -lt 30 ]; do
        rest=""
        for name in $(names); do if [ "$name" != s3 ] && alive "$name"; then rest=1; fi; done
        [ -z "$rest" ] && break
        sleep 0.5
    done
    p=$(pid_of s3)
    if [ -n "$p" ]; then
        any=1
        kill -TERM -- "-$p" 2>/dev/null || true
        t0=$SECONDS
        while running "$p" && [ $((SECONDS - t0)) -lt 15 ]; do sleep 0.5; done
    fi
    # What is left: members of the recorded process groups, and processes with this cluster's
    # marker (job drivers run in sessions of their own; orphans keep the marker).
    rest=$( (for name in $(names); do group_pids "$(pid_of "$name")"; done; marked_pids) | sort -un | grep -vx "$$" |
        while read -r p; do if running "$p"; then echo "$p"; fi; done || true)
    if [ -n "$rest" ]; then
        echo "down: killing $(echo "$rest" | wc -l) leftover process(es): $(ps -o comm= -p "$(echo $rest | tr ' ' ,)" | sort | uniq -c | xargs)" >&2
        # shellcheck disable=SC2086
        kill -KILL $rest 2>/dev/null || true
    fi
    p=$(pid_of netns)
    if [ -n "$p" ]; then any=1; kill -KILL "$p" 2>/dev/null || true; fi
    for name in $(names) netns; do rm -f "$STATE/$name.pid"; done
    rm -f "$STATE/cluster.env"
    if [ $any = 1 ]; then echo "down: stopped what cluster/local.sh up started ($STATE)"; else echo "nothing to stop"; fi
}

status() {
    local name rc=0
    for name in $(names); do
        if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; rc=3; fi
    done
    if alive head; then
        ray_status 20 || { echo "ray status: no answer from 127.0.0.1:$GCS_PORT within 20s" >&2; rc=3; }
    fi
    return $rc
}

pids() { local name; for name in $(names) netns; do [ -f "$STATE/$name.pid" ] && echo "$name $(pid_of "$name")"; done; return 0; }

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) client_env ;;
    runtime-env) runtime_env_json ;;
    pids) pids ;;
    exec)
        shift
        [ "${1:-}" = "--" ] && shift
        eval "$(client_env)"
        export PATH="$BIN:$PATH"
        in_ns "$@"
        ;;
    *)
        echo "usage: cluster/local.sh up|status|env|runtime-env|exec -- CMD|pids|down" >&2
        exit 2
        ;;
esac
