#!/usr/bin/env bash
# Kernel correctness and timing on a GPU, one device call: each check has its own time limit so a
# hang or failure in one does not cost the others. Logs go to $OUT (or /tmp/gpu_checks).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tee "$OUT/env.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/env.log"
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name exit $?"
  tail -n 40 "$OUT/$name.log"
}
for step in ${CHECKS:-attention cema tsn}; do
  case $step in
    attention) run attention "${ATTN_LIMIT:-150}" python3 experiments/gpu_checks/check_chunk_attention.py --profile --iters 10 ;;
    cema) run cema "${CEMA_LIMIT:-200}" python3 experiments/gpu_checks/check_cema.py --lengths 32768 --iters 10 --skip-baselines --sweep --json "$OUT/cema.json" ;;
    tsn) run tsn "${TSN_LIMIT:-150}" python3 experiments/gpu_checks/check_timestep_norm.py --iters 10 ;;
  esac
done
