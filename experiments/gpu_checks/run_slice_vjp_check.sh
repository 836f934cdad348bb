#!/usr/bin/env bash
# One two-GPU device call (~5 min on a cold machine) that decides whether a sequence-parallel
# change may merge (it decided branches sp-slice-vjp and sp-fewer-saved in session 9):
#   1. on GPU 0: the slice summary (kernels_pallas.cema_summary.slice_summary_planes) against its
#      XLA form (h, dx and the CEMA parameters' gradients; tolerance 1e-5 / 1e-4 of the largest
#      entry) and its per-layer kernels at L/2 = 16384;
#   2. the mega200M sequence-parallel step on 1 and 2 GPUs (run_h200_x2.sh X1 --modes sequence);
#      main at 6e74723 took 146.5 / 89.2 ms (82.1%).
# Merge if the check passes and the two-GPU step is not slower.
#   RESULTS_DIR=$OUT bash experiments/gpu_checks/run_slice_vjp_check.sh
set -u
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS_DIR:-${OUT:-/tmp/slice_vjp}}; mkdir -p "$RESULTS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 experiments/gpu_checks/check_sequence_parallel.py --single_device \
  --only cema --rows "Pallas powers (S1')" --kernels 3 --json "$RESULTS/slice_vjp_check.json" \
  > "$RESULTS/slice_vjp_check.log" 2>&1
echo "check exit $?"; grep -v "^WARNING\|^I0000\|^E0000\|^W0000" "$RESULTS/slice_vjp_check.log" | tail -n 24
RESULTS_DIR=$RESULTS timeout 330 bash experiments/benchmarks/run_h200_x2.sh X1 --modes sequence > "$RESULTS/X1.log" 2>&1
grep -v "^WARNING\|^I0000\|^E0000\|^W0000" "$RESULTS/X1.log" | grep -E "ms/step|target"
