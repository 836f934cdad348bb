#!/usr/bin/env bash
# The H200 benchmark runs, as three device calls of at most ~9 minutes each.
#
#   bash experiments/benchmarks/run_h200.sh A    # ops: Pallas vs XLA vs floors (+ the kernels' GPU checks;
#                                                #   SKIP_CHECKS=1 leaves those out)
#   bash experiments/benchmarks/run_h200.sh B    # train step: Megalodon vs Llama, 200M and 1.3B
#   bash experiments/benchmarks/run_h200.sh C    # decoding: batch 1 / 16 at 4K / 32K / 128K
#   bash experiments/benchmarks/run_h200.sh D    # the rows still missing: CEMA numerics (full), 1.3B at
#                                                #   1 x 32768, decoding 1.3B; two queues side by side
#                                                #   when the machine has two GPUs (one GPU each)
#   bash experiments/benchmarks/run_h200.sh E    # decoding, 1.3B and 200M, device and host generation loops
#   bash experiments/benchmarks/run_h200.sh smoke  # all three scripts in --smoke mode (CPU, ~3 min)
#
# Run from the repository root. Results (JSON, one file per benchmark) and logs go to $OUT when it
# is set (the device tool returns $OUT), else to experiments/results. Every step has its own time
# limit, so one slow or hanging step cannot take the whole call down; the benchmarks rewrite their
# JSON after every row, so a step cut short still leaves what it measured. Extra arguments after
# the call letter are passed to every benchmark script of that call (e.g. --iters 5).
set -uo pipefail

cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Grow GPU memory on demand (no 75% preallocation), up to 96% of the device: the 1.3B train step
# without rematerialisation needs most of the 141 GB.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.96
# Reuse compilations if a call is repeated on the same (still warm) machine.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/megalodon_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# The device copy of the repository may have no .git: record the commit the lead ran.
export GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

RESULTS="${RESULTS_DIR:-${OUT:-experiments/results}}"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
CALL="${1:-}"
shift || true
EXTRA=("$@")
START=$SECONDS
rm -f "$LOGS/status.txt"

# step NAME SECONDS CMD...: runs CMD with a time limit, output to the terminal and $LOGS/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== [$((SECONDS - START)) s] $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) echo "$name: ok" >> "$LOGS/status.txt" ;;
    124|137) echo "$name: TIMED OUT after ${limit} s (partial results kept)" >> "$LOGS/status.txt" ;;
    *) echo "$name: exit code $rc" >> "$LOGS/status.txt" ;;
  esac
}

gpu_snapshot() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu \
      --format=csv | tee "$LOGS/nvidia-smi-$CALL.csv"
  fi
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
}

case "$CALL" in
  A)  # ~6-8 min: floors (inside bench_ops), 3 ops x {Pallas, XLA}, then the kernel owners' checks.
    gpu_snapshot
    step ops 320 python3 -m experiments.benchmarks.bench_ops --variant timestep_norm:time_splits=8 \
      --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    if [ "${SKIP_CHECKS:-0}" != 1 ]; then  # SKIP_CHECKS=1: the benchmark only (~4-5 min)
      step check_chunk_attention 60 python3 experiments/gpu_checks/check_chunk_attention.py
      if [ -f experiments/gpu_checks/check_timestep_norm.py ]; then
        step check_timestep_norm 60 python3 experiments/gpu_checks/check_timestep_norm.py
      fi
      step check_cema 90 python3 experiments/gpu_checks/check_cema.py --iters 10 --skip-baselines \
        --json "$RESULTS/check_cema.json"
    fi
    ;;
  B)  # ~7-9 min: 8 train-step compiles (2 sizes x 2 shapes x 2 models).
    gpu_snapshot
    # Megalodon's fastest policy on an H200 (2026-11-29) for both sizes: recompute_elementwise
    # stores the outputs of matmuls, kernels and reductions and recomputes elementwise work (the
    # layer scan's stacking of everything costs more than recomputing it). Llama: none / full.
    step train_200M 200 python3 -m experiments.benchmarks.bench_train --sizes 200M --name train_200M \
      --remat recompute_elementwise --llama-remat none --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    step train_1.3B 320 python3 -m experiments.benchmarks.bench_train --sizes 1.3B --name train_1.3B \
      --remat recompute_elementwise --llama-remat full --oom-remat save_cema_attention \
      --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  C)  # ~6-8 min: per size, 6 Llama compiles (one per batch x context) and 2 Megalodon compiles.
    gpu_snapshot
    step decode_200M 230 python3 -m experiments.benchmarks.bench_decode --sizes 200M --name decode_200M \
      --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    step decode_1.3B 290 python3 -m experiments.benchmarks.bench_decode --sizes 1.3B --name decode_1.3B \
      --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  D)  # ~8 min on 2 GPUs (twice that on one): each queue is pinned to its own GPU, so the two
      # never share a device and their timings are as on a machine of one GPU.
    gpu_snapshot
    queue_numerics() {
      # The full preset stops at its 270 s budget after 16K (plus 4K bf16); the longer lengths need
      # two more runs and a merge (experiments/cema_numerics.py's docstring, docs/cema_numerics.md).
      step cema_numerics 330 python3 -m experiments.cema_numerics --preset=full --out_dir="$RESULTS" \
        --plot_dir="$RESULTS/plots"
      step check_cema_defaults 100 python3 experiments/gpu_checks/check_cema.py --iters 10 --skip-baselines \
        --json "$RESULTS/check_cema.json"
      if [ -d .v3 ]; then  # a candidate kernel carried beside the tree (not committed): same check
        step check_cema_candidate 120 env PYTHONPATH=".v3:$PYTHONPATH" python3 .v3/check_cema.py --iters 10 \
          --skip-baselines --json "$RESULTS/check_cema_candidate.json"
      fi
    }
    queue_rows() {
      step train_1.3B_32K 300 python3 -m experiments.benchmarks.bench_train --sizes 1.3B --shapes 1x32768 \
        --name train_1.3B_32K --remat recompute_elementwise --llama-remat full \
        --oom-remat save_cema_attention --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
      step decode_1.3B 260 python3 -m experiments.benchmarks.bench_decode --sizes 1.3B --name decode_1.3B \
        --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    }
    if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=0 queue_numerics &
      CUDA_VISIBLE_DEVICES=1 queue_rows &
      wait
    else
      queue_numerics
      queue_rows
    fi
    ;;
  E)  # ~7 min: decoding after the batch-1 GEMM-path fix (ops/dense.py), both generation loops
      # (--loop device: the tokens of a row in one jitted fori_loop; host: Python dispatches each step).
    gpu_snapshot
    step decode_overhead 170 python3 experiments/gpu_checks/check_decode_overhead.py --archs megalodon,llama \
      --json "$RESULTS/decode_overhead.json" --trace_dir /tmp/decode_trace
    for size in 1.3B 200M; do
      for loop in device host; do
        step "decode_${size}_${loop}" 240 python3 -m experiments.benchmarks.bench_decode --sizes "$size" --loop "$loop" \
          --name "decode-${size,,}-${loop}-loop" --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
      done
    done
    ;;
  smoke)  # CPU check of the three scripts end to end.
    export JAX_PLATFORMS=cpu
    step ops_smoke 300 python3 -m experiments.benchmarks.bench_ops --smoke --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    step train_smoke 300 python3 -m experiments.benchmarks.bench_train --smoke --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    step decode_smoke 300 python3 -m experiments.benchmarks.bench_decode --smoke --results-dir "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"}
    ;;
  *)
    echo "usage: bash experiments/benchmarks/run_h200.sh A|B|C|D|E|smoke [extra benchmark args]" >&2
    exit 2
    ;;
esac

echo
echo "=== call $CALL done in $((SECONDS - START)) s; results in $RESULTS"
sed 's/^/  /' "$LOGS/status.txt"
