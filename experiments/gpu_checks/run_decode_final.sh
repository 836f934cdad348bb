#!/usr/bin/env bash
# Decode speed, final same-run comparison: bench_decode at 1.3B, batch 1 and 16, 32K, Megalodon
# (decoding.generate's default and CANDIDATES) vs Llama; then the kernel profile of the batch-1 default.
#   bash experiments/gpu_checks/run_decode_final.sh        # logs and JSON under $OUT
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_final}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
CANDIDATES=${CANDIDATES-fused-dot-shifted-pallas-scores,fused-mask-shifted}
echo "=== bench_decode 1.3B x batch ${BATCHES:-1,16} x 32K, device loop (limit ${BENCH_LIMIT:-190}s): default,$CANDIDATES"
timeout "${BENCH_LIMIT:-190}" python3 -m experiments.benchmarks.bench_decode --sizes 1.3B --batches "${BATCHES:-1,16}" \
  --contexts 32768 --loop device --inner 16 --warmup 16 --iters 5 --llama-decode-attention cudnn \
  --mega-decode "default${CANDIDATES:+,$CANDIDATES}" --results-dir "$OUT" > "$OUT/bench.log" 2>&1
echo "exit $?"; quiet < "$OUT/bench.log" | grep -v "^tiny\|^note" | tail -n 25
if [ "${PROFILE:-default}" != none ]; then
  echo "=== check_decode_overhead, batch 1 (limit ${OVERHEAD_LIMIT:-60}s): ${PROFILE:-default}"
  timeout "${OVERHEAD_LIMIT:-60}" python3 experiments/gpu_checks/check_decode_overhead.py --loops device \
    --archs megalodon --iters 3 --trace_steps 2 --top 30 --mega-decode "${PROFILE:-default}" \
    --json "$OUT/overhead.json" > "$OUT/overhead.log" 2>&1
  echo "exit $?"; quiet < "$OUT/overhead.log" | tail -n 40
fi
