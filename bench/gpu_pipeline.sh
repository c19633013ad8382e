#!/usr/bin/env bash
# The pipeline on one GPU with the gpu profile, timed:  TANS_ROOT=/path/to/root bench/gpu_pipeline.sh OUT_DIR
#
# TANS_ROOT must already hold the ingested tasks (tans data ingest builtin:all); nothing is installed
# or downloaded. Stages, each under `timeout`:
#   zoo       tans build-zoo   --config configs/zoo/gpu.yaml
#   space     tans train-space --config configs/space/gpu.yaml
#   search    tans search      --config configs/search/gpu.yaml --dataset TASK   (one demo search: --oracle,
#             --max-params 4000000, as configs/demo/gpu.yaml runs each of its 7)
#   evaluate  tans evaluate    --config configs/evaluate/gpu.yaml --dataset TASK (one target)
# TASK is the first meta_test task of configs/splits/default.yaml (GPU_BENCH_TASK overrides it).
# While they run, nvidia-smi samples the GPU every second.
#
# OUT_DIR gets 7 flat files: stages.csv (per stage: wall time, exit status, images/s where the job
# prints it), nvidia-smi.csv (the samples), zoo.log, space.log, search.log, evaluate.log, and
# summary.txt (mean/peak GPU utilisation and peak memory per stage, from the samples).
#
# Environment (all optional):
#   GPU_BENCH_REUSE=1        reuse finished stages instead of redoing them (default: every stage runs
#                            with --force, so the times are real work; only the gpu zoo/space/runs change)
#   GPU_BENCH_PRECISION=bf16 run zoo and search with precision=bf16 (evaluate uses its recipe file's)
#   GPU_BENCH_TASK=NAME      the target task (must be in TANS_ROOT)
#   GPU_BENCH_TIMEOUT_{ZOO,SPACE,SEARCH,EVALUATE}  seconds per stage (900, 600, 600, 1200)
#   TANS=/path/to/tans       the command (default: `tans` on PATH, else .venv/bin/tans)
# Use a root of its own, or one without a local demo: spaces/LATEST ends up naming the gpu space.
set -euo pipefail

die() { echo "gpu_pipeline: $*" >&2; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: TANS_ROOT=ROOT bench/gpu_pipeline.sh OUT_DIR"
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this benchmark needs an NVIDIA GPU and its driver"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi cannot see a GPU (nvidia-smi -L failed)"
[[ -n "${TANS_ROOT:-}" ]] || die "TANS_ROOT is not set: point it at a root holding the ingested tasks (tans data ingest builtin:all)"
if [[ "$TANS_ROOT" != s3://* ]]; then
    [[ -d "$TANS_ROOT/tasks" ]] || die "TANS_ROOT=$TANS_ROOT holds no tasks/ folder: ingest first (tans data ingest builtin:all)"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"

if [[ -n "${TANS:-}" ]]; then
    TANS_CMD="$TANS"
elif command -v tans >/dev/null 2>&1; then
    TANS_CMD="$(command -v tans)"
elif [[ -x "$REPO/.venv/bin/tans" ]]; then
    TANS_CMD="$REPO/.venv/bin/tans"
else
    die "no tans command: set TANS=... or create .venv (make setup) first"
fi
PY="$(dirname "$TANS_CMD")/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

export RAY_USAGE_STATS_ENABLED=0  # no network, not even Ray's usage report

TASK="${GPU_BENCH_TASK:-}"
if [[ -z "$TASK" ]]; then
    TASK="$("$PY" -c 'import yaml; print(yaml.safe_load(open("configs/splits/default.yaml"))["meta_test"][0])' 2>/dev/null)" \
        || die "cannot read the first meta_test task of configs/splits/default.yaml with $PY (set GPU_BENCH_TASK)"
fi
if [[ "$TANS_ROOT" != s3://* ]]; then
    [[ -f "$TANS_ROOT/tasks/$TASK/task.json" ]] || die "task $TASK is not in TANS_ROOT=$TANS_ROOT: ingest it first"
fi

FORCE=(--force)
[[ "${GPU_BENCH_REUSE:-0}" == 1 ]] && FORCE=()
ZOO_PREC=() SEARCH_PREC=()
case "${GPU_BENCH_PRECISION:-}" in
    "") ;;
    fp32 | bf16)
        ZOO_PREC=("pretrain.precision=$GPU_BENCH_PRECISION" "finetune.precision=$GPU_BENCH_PRECISION"
                  "measure.precision=$GPU_BENCH_PRECISION")
        SEARCH_PREC=("precision=$GPU_BENCH_PRECISION") ;;
    *) die "GPU_BENCH_PRECISION must be fp32 or bf16, got ${GPU_BENCH_PRECISION}" ;;
esac

# -- GPU samples in the background, stopped however the script ends ------------------------------
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 >"$OUT/nvidia-smi.csv" 2>/dev/null &
SMI_PID=$!
stop_smi() {
    if kill -0 "$SMI_PID" 2>/dev/null; then
        kill "$SMI_PID" 2>/dev/null || true
        wait "$SMI_PID" 2>/dev/null || true
    fi
}
trap stop_smi EXIT
sleep 2  # a baseline sample or two before the first stage

echo "stage,start_unix,end_unix,wall_s,exit_code,images_per_s_mean,images_per_s_max" >"$OUT/stages.csv"

# run_stage NAME TIMEOUT_S CMD...: runs CMD under timeout into OUT/NAME.log, appends to stages.csv.
FAILED=""
run_stage() {
    local name=$1 limit=$2
    shift 2
    local start end rc ips
    echo "[gpu_pipeline] $name: $* (timeout ${limit}s)"
    start=$(date +%s.%N)
    if timeout --kill-after=30 "$limit" "$@" >"$OUT/$name.log" 2>&1; then rc=0; else rc=$?; fi
    end=$(date +%s.%N)
    # images/s as the job prints it (pretraining: "... 412 images/s ..."), mean and max
    ips=$(grep -oE '[0-9]+(\.[0-9]+)? images/s' "$OUT/$name.log" | awk '{s += $1; if ($1 > m) m = $1; n++}
        END {if (n) printf "%.0f,%.0f", s / n, m; else printf ","}' || true)
    [[ -n "$ips" ]] || ips=","
    echo "$name,$start,$end,$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}'),$rc,$ips" >>"$OUT/stages.csv"
    echo "[gpu_pipeline] $name: exit $rc after $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.0f", b - a}')s"
    if [[ $rc -ne 0 ]]; then
        local why="exit $rc"
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then why="timed out after ${limit}s"; fi
        FAILED="$name ($why); see $OUT/$name.log"
        return 1
    fi
}

stages() {
    run_stage zoo "${GPU_BENCH_TIMEOUT_ZOO:-900}" \
        "$TANS_CMD" build-zoo --config configs/zoo/gpu.yaml "${FORCE[@]}" "${ZOO_PREC[@]}" || return 0
    run_stage space "${GPU_BENCH_TIMEOUT_SPACE:-600}" \
        "$TANS_CMD" train-space --config configs/space/gpu.yaml "${FORCE[@]}" || return 0
    run_stage search "${GPU_BENCH_TIMEOUT_SEARCH:-600}" \
        "$TANS_CMD" search --config configs/search/gpu.yaml --dataset "$TASK" --space gpu --name "gpu-bench-$TASK" \
        --oracle --max-params 4000000 "${FORCE[@]}" "${SEARCH_PREC[@]}" || return 0
    run_stage evaluate "${GPU_BENCH_TIMEOUT_EVALUATE:-1200}" \
        "$TANS_CMD" evaluate --config configs/evaluate/gpu.yaml --dataset "$TASK" --space gpu --name gpu-bench \
        "${FORCE[@]}" || return 0
}
stages
sleep 2
stop_smi

# -- summary: per-stage utilisation from the samples ----------------------------------------------
"$PY" - "$OUT" "$TASK" "${GPU_BENCH_PRECISION:-config}" "${#FORCE[@]}" >"$OUT/summary.txt" <<'EOF'
import csv, datetime, os, platform, subprocess, sys

out, task, precision, forced = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
samples = []  # (unix time, utilisation %, memory MiB)
with open(os.path.join(out, "nvidia-smi.csv")) as f:
    for row in csv.reader(f, skipinitialspace=True):
        try:
            t = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(row[1].split()[0]), float(row[2].split()[0])))
        except (ValueError, IndexError):
            continue  # the header, or a line cut off when sampling stopped
with open(os.path.join(out, "stages.csv")) as f:
    stages = list(csv.DictReader(f))
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip().replace("\n", "; ")
try:
    import torch
    torch_v = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
except Exception as exc:  # noqa: BLE001
    torch_v = f"torch not importable ({type(exc).__name__})"
print(f"gpu_pipeline: gpu profile, target task {task}, precision {precision}, "
      f"{'every stage forced' if forced else 'finished stages reused'}")
print(f"GPU: {gpu}; {os.cpu_count()} CPUs; Python {platform.python_version()}; {torch_v}")
print(f"{len(samples)} nvidia-smi samples (every 1 s)")
print()
print(f"{'stage':<9} {'wall_s':>8} {'exit':>5} {'images/s':>9} {'samples':>8} {'util_mean%':>11} {'util_peak%':>11} "
      f"{'mem_peak_MiB':>13}")
walls = {}
for s in stages:
    t0, t1 = float(s["start_unix"]), float(s["end_unix"])
    inside = [x for x in samples if t0 <= x[0] <= t1]
    util = [x[1] for x in inside]
    mem = [x[2] for x in inside]
    walls[s["stage"]] = float(s["wall_s"]) if s["exit_code"] == "0" else None
    mean = f"{sum(util) / len(util):.1f}" if util else "-"
    peak = f"{max(util):.0f}" if util else "-"
    print(f"{s['stage']:<9} {float(s['wall_s']):>8.1f} {s['exit_code']:>5} {s['images_per_s_mean'] or '-':>9} "
          f"{len(inside):>8} {mean:>11} {peak:>11} {(f'{max(mem):.0f}' if mem else '-'):>13}")
print()
if all(walls.get(k) is not None for k in ("zoo", "space", "search")):
    est = walls["zoo"] + walls["space"] + 7 * walls["search"]
    print(f"gpu demo estimate (zoo + space + 7 x this search, data already in the root): {est:.0f} s "
          f"(target <= 480 s){'' if est <= 480 else '  ** over target **'}")
else:
    print("gpu demo estimate: - (a stage failed or did not run)")
EOF

if [[ -n "$FAILED" ]]; then
    die "stage $FAILED"
fi
echo "[gpu_pipeline] done: $OUT/summary.txt"
cat "$OUT/summary.txt"
