#!/usr/bin/env bash
# The Mosaic GPU scores kernel's overlapped schedule (scores_mgpu overlap=True) on an H200: one device
# call per part, each short. Logs and JSON go to $OUT (or ./scores_overlap_out).
#   bash experiments/gpu_checks/run_scores_overlap.sh probe  # the kernel alone: serial vs overlap, ring depths,
#                                                            # staging buffers; errors against Triton (< 2 min)
#   bash experiments/gpu_checks/run_scores_overlap.sh fix    # the warp-uniform bound decision (no C7520?) against
#                                                            # the old lowering, ptxas -v of every kernel (< 2 min)
#   bash experiments/gpu_checks/run_scores_overlap.sh ab     # the whole op fwd+bwd: interleaved A/B of
#                                                            # MEGALODON_ATTENTION_SCORES_OVERLAP unset vs 1
set -u
OUT=${OUT:-scores_overlap_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
case "${1:-probe}" in
  probe)
    # ptxas -v of the 6-stage kernels: registers, spills, and whether ptxas serialised the wgmma.
    timeout 115 python3 experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT" --ptxas "st 6" \
      --name probe-mgpu-scores-overlap > "$OUT/probe_scores_overlap.log" 2>&1
    echo "probe rc $?"; grep -iE "serializ|registers|^B1 |^==|^->" "$OUT/probe_scores_overlap.log" | cut -c1-220
    ;;
  fix)
    timeout 115 python3 experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT" --set fix --ptxas \
      --compile-budget-s 75 --rounds 3 --name probe-mgpu-scores-fix > "$OUT/probe_scores_fix.log" 2>&1
    echo "probe rc $?"; grep -iE "serializ|registers|^\{" "$OUT/probe_scores_fix.log" | cut -c1-260
    ;;
  ab)
    timeout 500 python3 experiments/gpu_checks/ab_attention_env.py MEGALODON_ATTENTION_SCORES_OVERLAP "" 1 \
      --rounds 15 --json "$OUT/ab_scores_overlap.json" > "$OUT/ab_scores_overlap.log" 2>&1
    echo "ab rc $?"; tail -3 "$OUT/ab_scores_overlap.log"
    ;;
  *) echo "usage: $0 probe|fix|ab" >&2; exit 2 ;;
esac
