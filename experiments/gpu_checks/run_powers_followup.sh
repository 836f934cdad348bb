#!/usr/bin/env bash
# One single-GPU device call (~6 min) for what session 6 left open about the double-float powers:
#  1. the Pallas power tables against XLA's on the GPU (values, at mega200M's layer shapes) and
#     the device times of the sequence-parallel state correction's pieces with both table impls
#     (XLA's loop now forms the squares once per (d, n): its new time is unmeasured);
#  2. CEMA fwd+bwd at B=1 D=4096 L=32768 with the chunk-power kernels' block (powers_block) at 64
#     lanes per program against the default 1024, alternated (rows later in a run read slower):
#     session 6's partial run had 3.369 against 3.403 ms, within the spread.
#   OUT=/tmp/out bash experiments/gpu_checks/run_powers_followup.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/powers_followup}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quiet() { grep -v "^WARNING\|^I0000\|^E0000\|^W0000"; }
timeout 150 python3 experiments/gpu_checks/check_sequence_parallel.py --single_device --only cema \
  --rows "ideal,S1,Pallas" --inner 10 --json "$OUT/sp_powers.json" > "$OUT/sp_powers.log" 2>&1
echo "sequence-parallel pieces exit $?"; quiet < "$OUT/sp_powers.log" | tail -n 10
timeout 330 python3 experiments/benchmarks/bench_ops.py --ops cema --cema-impls pallas --cema-lengths 32768 \
  --passes fwdbwd --variant cema:powers_block=64 --variant cema:powers_block=1024 \
  --variant cema:powers_block=64,pallas_powers=True --skip-ceilings --results-dir "$OUT" \
  --name cema_powers_block_ab > "$OUT/cema_powers_block_ab.log" 2>&1
echo "powers_block A/B exit $?"; quiet < "$OUT/cema_powers_block_ab.log" | grep "^cema\|^target"
