#!/usr/bin/env bash
# CEMA fwd / fwd+bwd at B=1 D=4096 N=16, L=32768 and 16384: the power-table kernels' block
# (CemaKernelConfig.powers_block; the q^chunk table took 53 us at 1024 lanes per program, 64
# programs) against the default and XLA's tables, in one run; then the kernel trace of the default.
#   OUT=/tmp/out bash experiments/gpu_checks/run_cema_powers.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cema_powers}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
timeout 300 python3 experiments/benchmarks/bench_ops.py --ops cema --cema-impls pallas --cema-lengths 32768 16384 \
  --variant cema:powers_block=256 --variant cema:powers_block=64 --variant cema:pallas_powers=False --skip-ceilings \
  --results-dir "$OUT" --name cema_powers_block > "$OUT/cema_powers_block.log" 2>&1
echo "exit $?"; quiet < "$OUT/cema_powers_block.log" | grep "^cema\|^target"
timeout 150 python3 experiments/gpu_checks/profile_ops.py --ops cema --cema-lengths 32768 --cema-impls pallas \
  --pass fwdbwd --json "$OUT/cema_profile.json" > "$OUT/cema_profile.log" 2>&1
echo "exit $?"; quiet < "$OUT/cema_profile.log" | tail -n 12
