#!/usr/bin/env bash
# TimestepNorm at the target shape (B1 L32768 D4096 G64 bf16): the default against the same
# kernels launched with the group blocks as the fastest grid axis (TiledConfig.groups_fastest)
# and tile shapes on top of it, with the per-kernel breakdown of both orders and the odd-shape
# GPU check of the new order; then (CEMA=1) the CEMA power-table A/B of run_cema_powers.sh.
#   OUT=/tmp/out bash experiments/gpu_checks/run_tsn_launch.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tsn_launch}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
timeout ${TSN_TIMEOUT:-300} python3 experiments/gpu_checks/check_timestep_norm.py --sweep launch --shapes target \
  --breakdown --skip-xla --json "$OUT/tsn_launch.json" > "$OUT/tsn_launch.log" 2>&1
echo "tsn exit $?"; quiet < "$OUT/tsn_launch.log" | grep -v "^\s*$" | tail -n 60
if [ "${CEMA:-0}" = 1 ]; then
  timeout ${CEMA_TIMEOUT:-260} python3 experiments/benchmarks/bench_ops.py --ops cema --cema-impls pallas \
    --cema-lengths 32768 16384 --variant cema:powers_block=256 --variant cema:powers_block=64 \
    --variant cema:pallas_powers=False --skip-ceilings --results-dir "$OUT" --name cema_powers_block \
    > "$OUT/cema_powers_block.log" 2>&1
  echo "cema exit $?"; quiet < "$OUT/cema_powers_block.log" | grep "^cema\|^target"
fi
