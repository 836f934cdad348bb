#!/usr/bin/env bash
# Decode speed, final same-run comparison at 1.3B, context 32768, device loop: bench_decode at batch 1
# (decoding.generate's default and B1_CANDIDATES) and batch 16 (default and B16_CANDIDATES), each with
# Llama in the same process; then the kernel profile of the batch-1 default.
#   bash experiments/gpu_checks/run_decode_final.sh        # logs and JSON under $OUT
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_final}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.96}  # Llama's 96 GiB KV cache at batch 16
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
B1_CANDIDATES=${B1_CANDIDATES-fused-reduce-fold-shifted-pallas-attend32x1024x256,fused-reduce-shifted-pallas-attend}
B16_CANDIDATES=${B16_CANDIDATES-fused-dot-shifted-pallas-scores}
bench() {  # bench BATCH IMPLS LIMIT NAME
  echo "=== bench_decode 1.3B batch $1 x 32K, device loop (limit $3 s): $2"
  timeout "$3" python3 -m experiments.benchmarks.bench_decode --sizes 1.3B --batches "$1" --contexts 32768 \
    --loop device --inner 16 --warmup 16 --iters 5 --llama-decode-attention cudnn --mega-decode "$2" \
    --results-dir "$OUT" --name "$4" > "$OUT/$4.log" 2>&1
  echo "exit $?"; quiet < "$OUT/$4.log" | grep "^llama\|^megalodon\|^target\|OOM\|rror" | grep -v "^tiny" | head -n 12
}
bench 1 "default${B1_CANDIDATES:+,$B1_CANDIDATES}" "${B1_LIMIT:-95}" decode_b1
bench 16 "default${B16_CANDIDATES:+,$B16_CANDIDATES}" "${B16_LIMIT:-95}" decode_b16
if [ "${PROFILE:-default}" != none ]; then
  echo "=== check_decode_overhead, batch 1 (limit ${OVERHEAD_LIMIT:-50}s): ${PROFILE:-default}"
  timeout "${OVERHEAD_LIMIT:-50}" python3 experiments/gpu_checks/check_decode_overhead.py --loops device \
    --archs megalodon --iters 3 --trace_steps 2 --top 30 --mega-decode "${PROFILE:-default}" \
    --json "$OUT/overhead.json" > "$OUT/overhead.log" 2>&1
  echo "exit $?"; quiet < "$OUT/overhead.log" | tail -n 36
fi
