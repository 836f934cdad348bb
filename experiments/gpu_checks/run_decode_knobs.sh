#!/usr/bin/env bash
# Decode knobs at one size (batch 1, context 32768, device loop): bench_decode with the default and
# each of IMPLS (Llama in the same process), then the kernel profile (and optimized HLO) of PROFILE.
#   SIZE=200M IMPLS=fused-...-ffn,... PROFILE=fused-... bash experiments/gpu_checks/run_decode_knobs.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_knobs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.96}
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
SIZE=${SIZE:-200M}
NAME=${NAME:-decode_knobs_$SIZE}
echo "=== bench_decode $SIZE batch 1 x 32K, device loop (limit ${LIMIT:-300} s): default,${IMPLS:-}"
timeout "${LIMIT:-300}" python3 -m experiments.benchmarks.bench_decode --sizes "$SIZE" --batches 1 --contexts 32768 \
  --loop device --inner 16 --warmup 16 --iters 5 --llama-decode-attention cudnn --mega-decode "default${IMPLS:+,$IMPLS}" \
  --results-dir "$OUT" --name "$NAME" > "$OUT/$NAME.log" 2>&1
echo "exit $?"; quiet < "$OUT/$NAME.log" | grep "^llama\|^megalodon\|^target\|OOM\|rror" | head -n 16
if [ -n "${PROFILE:-}" ]; then
  echo "=== check_decode_overhead $SIZE batch 1 (limit ${OVERHEAD_LIMIT:-120}s): $PROFILE"
  timeout "${OVERHEAD_LIMIT:-120}" python3 experiments/gpu_checks/check_decode_overhead.py --size "$SIZE" --loops device \
    --archs megalodon --iters 3 --trace_steps 2 --top 40 --mega-decode "$PROFILE" --hlo_dir "$OUT/hlo" \
    --json "$OUT/${NAME}_overhead.json" > "$OUT/${NAME}_overhead.log" 2>&1
  echo "exit $?"; quiet < "$OUT/${NAME}_overhead.log" | tail -n 48
fi
