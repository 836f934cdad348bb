#!/usr/bin/env bash
# Decode at 32K, device loop, both sizes: batch 1 with the default and the previous default interleaved
# (default, old, new spelled out, old: rows later in a run read a few % slower), then batch 16; Llama
# in each run.  OUT=/tmp/out bash experiments/gpu_checks/run_decode_session5.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/decode_session5}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.96
OLD=fused-reduce-fold-shifted-pallas-attend-res; NEW=$OLD-tsn1-headt-mergev-final
for size in 200M 1.3B; do
  timeout 200 python3 -m experiments.benchmarks.bench_decode --sizes $size --batches 1 --contexts 32768 --loop device --inner 16 --warmup 16 --iters 5 --llama-decode-attention cudnn --mega-decode "default,$OLD,$NEW,$OLD" --results-dir $OUT --name decode_b1_$size > $OUT/decode_b1_$size.log 2>&1; echo "exit $?"
  grep "^llama\|^megalodon\|^target" $OUT/decode_b1_$size.log | sed 's/cema=pallas tsn=pallas attn=pallas decode=//; s/cache.*//'
done
for size in 200M 1.3B; do
  timeout 150 python3 -m experiments.benchmarks.bench_decode --sizes $size --batches 16 --contexts 32768 --loop device --inner 16 --warmup 16 --iters 5 --llama-decode-attention cudnn --mega-decode default --results-dir $OUT --name decode_b16_$size > $OUT/decode_b16_$size.log 2>&1; echo "exit $?"
  grep "^llama\|^megalodon\|^target" $OUT/decode_b16_$size.log | sed 's/cema=pallas tsn=pallas attn=pallas decode=//; s/cache.*//'
done
