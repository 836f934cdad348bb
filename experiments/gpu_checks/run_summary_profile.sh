#!/usr/bin/env bash
# One single-GPU device call (~4-6 min on a cold machine: three rows compiled fwd and fwd+bwd, two
# checks) for what session 7 left open in sequence parallelism: the slice summary
# (ops.cema.cema_slice_summary with the chunk-summary kernel) took 0.303 / 0.569 ms fwd / fwd+bwd
# per mega200M layer at L/2 = 16384 although its power tables take ~0.1 ms; this times it with the
# slice's scan beside it, in both chunk-summary kernel layouts (planes, the measured default, and
# per-order lanes), and lists each program's slowest GPU kernels. First run 2026-11-29:
# per_order 0.489 ms fwd+bwd against planes 0.562 (now the default); the value check ran on bfloat16 x
# and failed by bfloat16 rounding of dx (now float32 x).
#   OUT=/tmp/out bash experiments/gpu_checks/run_summary_profile.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/summary_profile}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
timeout 420 python3 experiments/gpu_checks/check_sequence_parallel.py --single_device --only cema \
  --rows "(ideal),summary, Pallas" --inner 10 --kernels 5 --json "$OUT/sp_summary_profile.json" \
  > "$OUT/sp_summary_profile.log" 2>&1
echo "summary profile exit $?"; grep -v "^WARNING\|^I0000\|^E0000\|^W0000" "$OUT/sp_summary_profile.log" | tail -n 40
