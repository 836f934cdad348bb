#!/usr/bin/env bash
# Runs the kernel and model tests on this machine's GPU(s), one file at a time under a time limit,
# printing each file's result as soon as it is known (one long pytest call shows nothing until it
# ends, and a GPU lease may end first). Uses the python3 on PATH, whose jax must see the GPU.
#
#   bash scripts/test_gpu.sh                      # the default files below
#   bash scripts/test_gpu.sh tests/test_cema_kernel.py -k fwd_pairs   # one file, extra pytest args
#
# Both the interpreter tests (kernels run by the Pallas interpreter, on the GPU's host) and the
# tests marked `gpu` (compiled kernels) run; interpreter-only Mosaic GPU tests skip themselves.
# TEST_GPU_FILE_TIMEOUT (seconds, default 600) bounds each file. With pytest-xdist installed, each
# file runs on TEST_GPU_WORKERS processes (default 8; 0 for one), which share the GPU: most of the
# time goes to compiling kernels on the host (on an H200 machine with 16 cores, 8 workers ran the
# default files in about 10 minutes). Exit status: 1 if any file failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export MEGALODON_TEST_PLATFORM="${MEGALODON_TEST_PLATFORM:-gpu}" XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
limit="${TEST_GPU_FILE_TIMEOUT:-600}"
workers="${TEST_GPU_WORKERS:-8}"
parallel=()
if [[ "$workers" -gt 0 ]] && python3 -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers")
fi
files=()
extra=()
for arg in "$@"; do
  if [[ "$arg" == tests/*.py* ]]; then files+=("$arg"); else extra+=("$arg"); fi
done
if [[ ${#files[@]} -eq 0 ]]; then
  files=(tests/test_triton_backend.py tests/test_cema_kernel.py tests/test_cema_summary_kernel.py
         tests/test_chunk_attention_kernel.py tests/test_timestep_norm_kernel.py
         tests/test_timestep_norm_single_pass.py tests/test_timestep_norm_step_sums.py
         tests/test_block_matmul_mgpu.py tests/test_bwd_tiles_mgpu.py tests/test_scores_mgpu.py
         tests/test_decode_step_kernel.py tests/test_attention.py tests/test_model.py tests/test_decoding.py
         tests/test_cema.py tests/test_timestep_norm.py)
fi
status=0
for file in "${files[@]}"; do
  start=$(date +%s)
  log=$(mktemp)
  timeout "$limit" python3 -m pytest -q -rfE -o addopts="" -m "not slow" -p no:cacheprovider "$file" \
    ${parallel[@]+"${parallel[@]}"} ${extra[@]+"${extra[@]}"} >"$log" 2>&1
  rc=$?
  summary=$(grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$log" | grep -v "^ptxas")
  if [[ $rc -eq 124 ]]; then
    summary="TIMED OUT after ${limit} s; $(grep -cE '^[.FEsx]+' "$log") progress lines"
  fi
  echo "== $file ($(( $(date +%s) - start )) s, exit $rc)"
  echo "${summary:-$(tail -5 "$log")}"
  [[ $rc -ne 0 && $rc -ne 5 ]] && status=1  # 5: nothing collected
  rm -f "$log"
done
exit $status
