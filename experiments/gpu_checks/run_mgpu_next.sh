#!/usr/bin/env bash
# First GPU run of branch attn-mgpu-next's Mosaic GPU kernels (the backward tiles and the forward
# scores; neither has run on a GPU). Two parts, each sized for one 600 s device call:
#   bash experiments/gpu_checks/run_mgpu_next.sh probes   # kernel probes + gpu-marked tests
#   bash experiments/gpu_checks/run_mgpu_next.sh op       # the whole op: stages and bench_ops A/B
# Logs and JSON go to $OUT (or ./mgpu_next_out).
set -u
OUT=${OUT:-mgpu_next_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
case "${1:-probes}" in
  probes)
    timeout 200 python3 experiments/gpu_checks/probe_mgpu_matmul.py --no-example-matmul --no-block-causal \
      --results-dir "$OUT" --name probe-mgpu-bwd-tiles > "$OUT/probe_tiles.log" 2>&1
    echo "tiles probe rc $?"
    timeout 150 python3 experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT" > "$OUT/probe_scores.log" 2>&1
    echo "scores probe rc $?"
    timeout 100 python3 experiments/gpu_checks/probe_mgpu_scores.py --hot-rows 16 --results-dir "$OUT" \
      --name probe-mgpu-scores-hot > "$OUT/probe_scores_hot.log" 2>&1
    echo "scores probe (hot rows) rc $?"
    MEGALODON_TEST_PLATFORM=gpu timeout 120 python3 -m pytest -q -m gpu tests/test_bwd_tiles_mgpu.py \
      tests/test_scores_mgpu.py > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc $?"; tail -3 "$OUT/gpu_tests.log"
    ;;
  op)
    timeout 330 python3 experiments/gpu_checks/check_chunk_attention.py --configs default mgpu_tiles mgpu_scores \
      mgpu_all --parallel 4 --no-xla --json "$OUT/check_mgpu_next.json" > "$OUT/check_mgpu_next.log" 2>&1
    echo "check rc $?"; grep -A6 "^summary" "$OUT/check_mgpu_next.log"
    timeout 250 python3 -m experiments.benchmarks.bench_ops --ops chunk_attention --chunk-attention-impls pallas \
      --variant chunk_attention:tiles_impl=mgpu --variant chunk_attention:scores_impl=mgpu \
      --variant chunk_attention:tiles_impl=mgpu,scores_impl=mgpu --results-dir "$OUT" > "$OUT/bench_mgpu_next.log" 2>&1
    echo "bench rc $?"; grep "^chunk_attention " "$OUT/bench_mgpu_next.log"
    ;;
  *) echo "usage: $0 probes|op" >&2; exit 2 ;;
esac
