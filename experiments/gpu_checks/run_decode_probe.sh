#!/usr/bin/env bash
# GEMV layout probe + same-run decode baseline, one device call (each part under its own time limit).
#   bash experiments/gpu_checks/run_decode_probe.sh        # logs and JSON under $OUT
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_probe}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "=== probe_gemv (limit ${PROBE_LIMIT:-90}s)"
timeout "${PROBE_LIMIT:-90}" python3 experiments/gpu_checks/probe_gemv.py --json "$OUT/gemv.json" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^E0000" | tee "$OUT/gemv.log"
echo "=== check_decode_overhead (limit ${OVERHEAD_LIMIT:-150}s)"
timeout "${OVERHEAD_LIMIT:-150}" python3 experiments/gpu_checks/check_decode_overhead.py --loops device \
  --iters 3 --trace_steps 2 --top 40 --hlo_dir "$OUT/hlo" --mega-decode "${MEGA_DECODE:-fused-mask-shifted,fused-mask-shifted-pallas-scores,fused-dot-shifted-pallas-scores,fused-dot-shifted-pallas-attend}" \
  --json "$OUT/overhead.json" > "$OUT/overhead.log" 2>&1
echo "exit $?"
grep -v "^WARNING\|^I0000\|^E0000" "$OUT/overhead.log" | tail -n 150
