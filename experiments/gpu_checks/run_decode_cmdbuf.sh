#!/usr/bin/env bash
# Does the batch-1 decode step lose time to kernel launches? bench_decode (mega1.3B, batch 1, 32K,
# device loop, Megalodon only) under four XLA command-buffer settings, one process each (XLA_FLAGS
# are read at start-up):
#   default     XLA's default command buffers (fusions, custom calls, ... captured into CUDA graphs)
#   while       + WHILE and CONDITIONAL captured too
#   while_min1  + --xla_gpu_graph_min_graph_size=1
#   none        command buffers off (every kernel launched from the host)
#   bash experiments/gpu_checks/run_decode_cmdbuf.sh     # logs and JSON under $OUT
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_cmdbuf}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TYPES=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
run() {  # run FLAGS NAME
  echo "=== $2: XLA_FLAGS='$1'"
  XLA_FLAGS="$1" timeout 100 python3 -m experiments.benchmarks.bench_decode --sizes 1.3B --batches 1 \
    --contexts 32768 --archs megalodon --loop device --inner 16 --warmup 16 --iters 5 --mega-decode default \
    --results-dir "$OUT" --name "cmdbuf_$2" > "$OUT/cmdbuf_$2.log" 2>&1
  echo "exit $?"; grep "^megalodon\|rror" "$OUT/cmdbuf_$2.log" | head -n 5
}
run "" default
run "--xla_gpu_enable_command_buffer=$TYPES" while
run "--xla_gpu_enable_command_buffer=$TYPES --xla_gpu_graph_min_graph_size=1" while_min1
run "--xla_gpu_enable_command_buffer=" none
