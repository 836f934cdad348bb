#!/usr/bin/env bash
# First GPU run of branch attn-matmul-persistent (the Mosaic GPU block matmul's persistent schedule), each
# part sized for one device call of at most 5 minutes (logs and JSON go to $OUT, or ./matmul_persistent_out):
#   bash experiments/gpu_checks/run_matmul_persistent.sh tests  # gpu-marked tests of the block matmul kernel
#   bash experiments/gpu_checks/run_matmul_persistent.sh probe  # persistent rows against the op's defaults
#   bash experiments/gpu_checks/run_matmul_persistent.sh ab     # the op, interleaved A/B of the env switch
set -u
OUT=${OUT:-matmul_persistent_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
case "${1:-tests}" in
  tests)
    MEGALODON_TEST_PLATFORM=gpu timeout 280 python3 -m pytest -q -m gpu tests/test_block_matmul_mgpu.py \
      > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc $?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8
    ;;
  probe)
    # part 2 only: the forward and transposed defaults (4 stages, 64-column stores) and the persistent rows
    timeout 280 python3 experiments/gpu_checks/probe_mgpu_matmul.py --no-example-matmul --no-bwd-tiles \
      --only "st 4 epi 64 immediate" persistent --results-dir "$OUT" --name probe-mgpu-matmul-persistent \
      > "$OUT/probe_persistent.log" 2>&1
    echo "probe rc $?"; grep -A14 "^== probe" "$OUT/probe_persistent.log" | cut -c1-200
    ;;
  ab)
    timeout 280 python3 experiments/gpu_checks/ab_attention_env.py MEGALODON_ATTENTION_MATMUL_PERSISTENT "" 132 \
      --rounds 21 --json "$OUT/ab_matmul_persistent.json" 2>&1 | grep -v Warning | tail -2
    ;;
  *) echo "usage: $0 tests|probe|ab" >&2; exit 2 ;;
esac
