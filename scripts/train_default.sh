#!/usr/bin/env bash
# The main job: train the default small Megalodon on the embedded Shakespeare corpus (CPU, minutes),
# print validation bits per byte against the unigram baseline, save a checkpoint, print a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false"
WORKDIR=${WORKDIR:-workdir/shakespeare_char}
exec .venv/bin/python -m experiments.train --config=configs/shakespeare_char.py --workdir="$WORKDIR" "$@"
