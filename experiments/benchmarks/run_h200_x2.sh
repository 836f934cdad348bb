#!/usr/bin/env bash
# Multi-GPU runs (issue 7) on an nvidia-h200-x2 machine, as device calls of at most ~9 minutes each.
#
#   bash experiments/benchmarks/run_h200_x2.sh T    # the sharding tests on the GPUs (NCCL), ~4 min
#   bash experiments/benchmarks/run_h200_x2.sh X1   # mega200M scaling
#   bash experiments/benchmarks/run_h200_x2.sh X2   # mega1.3B scaling + the 65536 / 131072-token
#                                                   #   sequence-parallel step
#   bash experiments/benchmarks/run_h200_x2.sh P    # profile: where the 2-GPU sequence-parallel step loses time
#                                                   #   (gpu_checks/check_sequence_parallel.py, ~4-5 min / 400 s;
#                                                   #   with --inner 10 each row compiles ~1 min: add --rows /
#                                                   #   --only to fit, e.g. P --inner 10 --only cema --rows sequence)
#   bash experiments/benchmarks/run_h200_x2.sh S    # the mega200M sequence step on 1 and 2 GPUs, traced: GPU
#                                                   #   kernel time per category (collectives apart) per device
#   bash experiments/benchmarks/run_h200_x2.sh smoke  # the same steps on 8 simulated CPU devices
#
# Run from the repository root. Results and logs go to $RESULTS_DIR, else $OUT, else experiments/results:
# one JSON per call, <date>_nvidia-h200x2_scaling-200m.json (X1) and ..._scaling-1.3b.json (X2),
# which every step of the call appends to (bench_scaling --append) and rewrites after every row.
# Every step has its own time limit, so a slow step cannot take the call down.
#
# Time plan. A Megalodon train step compiles in ~90 s on an H200 host (200M or 1.3B alike), so each
# scaling step compiles all its rows at the same time (WORKERS, default 5, on the host's 32 cores;
# WORKERS=1 compiles each row just before it runs), then times them one after the other (~10 steps
# and an initialisation each, 10-25 s per row). Expected / limit:
#   T:  sharding tests ~220 s / 330 s (measured 2026-11-28)
#   X1: GPU snapshot ~10 s; 200M data n=1,2 + sequence 1x32768 n=1,2 ~280 s (measured; 241 s of it compiling) / 400 s
#   X2: 1.3B data n=1,2 + sequence 1x32768 n=1,2 + 1x65536 over all GPUs ~5-6 min / 400 s;
#       1.3B 1x131072 over all GPUs ~2 min / 130 s (what is left of the call)
# Rows run most important first, and a step cut short keeps the rows it finished.
set -uo pipefail

cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) stays off on these machines.
export NCCL_NVLS_ENABLE=0
# Grow GPU memory on demand up to 96% of each device (see run_h200.sh).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.96
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/megalodon_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

RESULTS="${RESULTS_DIR:-${OUT:-experiments/results}}"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
CALL="${1:-}"
shift || true
EXTRA=("$@")
START=$SECONDS
STATUS=()
WORKERS="${WORKERS:-5}"
PYTHON="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null; then
  NGPU=$(nvidia-smi -L | grep -c '^GPU')
else
  NGPU=2  # smoke: the simulated CPU devices
fi
# Device counts of the scaling rows: 1 and 2, and 4, 8 where lent (the time plan assumes 2).
case "$NGPU" in
  8) DEVICES="${DEVICES:-1,2,4,8}" ;;
  4) DEVICES="${DEVICES:-1,2,4}" ;;
  *) DEVICES="${DEVICES:-1,2}" ;;
esac
# The long rows without rematerialisation need ~179 GiB per GPU on 2 GPUs (mega1.3B at 32768 tokens
# per GPU; bench_train 2026-11-28), more than an H200 holds, so on 2 GPUs they start with
# save_cema_attention; on 4 or more they start without and --oom-remat retries.
if [ "$NGPU" -le 2 ]; then LONG_REMAT="${LONG_REMAT:-save_cema_attention}"; else LONG_REMAT="${LONG_REMAT:-none}"; fi

# step NAME SECONDS CMD...: runs CMD with a time limit, output to the terminal and $LOGS/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== [$((SECONDS - START)) s] $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS+=("$name: ok") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${limit} s (partial results kept)") ;;
    *) STATUS+=("$name: exit code $rc") ;;
  esac
}

gpu_snapshot() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit,temperature.gpu \
      --format=csv | tee "$LOGS/nvidia-smi-$CALL.csv"
    nvidia-smi topo -m | tee "$LOGS/nvidia-smi-topo-$CALL.txt"
  fi
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE devices=$DEVICES long_remat=$LONG_REMAT workers=$WORKERS"
}

# scaling STEP SECONDS SIZE ARGS...: one bench_scaling invocation appending to this call's results file.
scaling() {
  local name=scaling_$1 limit=$2 size=$3
  shift 3
  step "$name" "$limit" "$PYTHON" -m experiments.benchmarks.bench_scaling --sizes "$size" --devices "$DEVICES" \
    --compile-workers "$WORKERS" --name "scaling_$size" --append --results-dir "$RESULTS" "$@" \
    ${EXTRA[@]+"${EXTRA[@]}"}
}

sharding_tests() {
  if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    # No internet on the device: install carried wheels if there are any (WHEELS=dir).
    if [ -d "${WHEELS:-shared/wheels}" ]; then
      "$PYTHON" -m pip install --no-index --find-links "${WHEELS:-shared/wheels}" pytest
    else
      echo "pytest is not installed and there is no wheel directory (WHEELS=...): skipping the tests"
      STATUS+=("sharding_tests: SKIPPED (no pytest)")
      return
    fi
  fi
  # The last -m wins over pyproject's addopts ('not slow and not gpu'); no xdist, one process.
  # MEGALODON_TEST_PLATFORM empty: the CPU run with 8 simulated devices (tests/conftest.py).
  step sharding_tests "$1" env MEGALODON_TEST_PLATFORM="$2" "$PYTHON" -m pytest -p no:cacheprovider -q -rs \
    tests/test_sharding.py tests/test_sequence_parallel.py -m "not slow"
}

case "$CALL" in
  T)  # 25 tests on 2 GPUs took 220 s on 2026-11-28 (compiles), more than X1 had room for.
    gpu_snapshot
    sharding_tests 330 gpu
    ;;
  X1)
    gpu_snapshot
    scaling 200M 400 200M --modes data,sequence --seq-lengths 32768
    ;;
  X2)
    gpu_snapshot
    # One H200 needs rematerialisation for 1.3B at 8x4096 and at 1x32768 (179 GiB without): the data
    # and sequence rows all use save_cema_attention, so that n=1 and n=2 compare like for like.
    # Then point 3: one sequence of 65536 tokens over all GPUs (LONG_REMAT, see above).
    scaling 1.3B 400 1.3B --modes data,sequence,long --seq-lengths 32768 --remat save_cema_attention \
      --long-lengths 65536 --long-remat "$LONG_REMAT" --oom-remat save_cema_attention --iters 5
    scaling 1.3B_131K 130 1.3B --modes long --long-lengths 131072 --long-remat "$LONG_REMAT" \
      --oom-remat save_cema_attention --warmup 1 --iters 3
    ;;
  P)
    gpu_snapshot
    step check_sequence_parallel 400 "$PYTHON" experiments/gpu_checks/check_sequence_parallel.py --json "$RESULTS/check_sequence_parallel.json" --trace_dir "$RESULTS/trace" --hlo_dir "$RESULTS/hlo" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  S)  # ~2 compiles of ~1 min and two short traces; the traces stay on the device (summarised there,
      # with the time per source line and what the 2-GPU step spends beyond half the 1-GPU one).
      # CUDA graphs off, so that every kernel in the trace names its HLO instruction.
    gpu_snapshot
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
    step step_profile 400 "$PYTHON" experiments/gpu_checks/check_sequence_parallel.py --step_only --trace_devices 1,2 \
      --trace_dir /tmp/sp_step_trace --json "$RESULTS/check_sequence_parallel_step.json" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  smoke)  # the calls' steps on 8 simulated CPU devices with the tiny model (~3 min)
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8"
    sharding_tests 600 ""
    step scaling_smoke 300 "$PYTHON" -m experiments.benchmarks.bench_scaling --smoke --devices "$DEVICES" \
      --compile-workers "$WORKERS" --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  *)
    echo "usage: bash experiments/benchmarks/run_h200_x2.sh T|X1|X2|P|S|smoke [extra args of the call's script]" >&2
    exit 2
    ;;
esac

echo
echo "=== call $CALL done in $((SECONDS - START)) s; results in $RESULTS"
printf '  %s\n' "${STATUS[@]}"
