"""Interleaved A/B of chunk_attention fwd+bwd under two (or more) values of environment switches, one process.

  python experiments/gpu_checks/ab_attention_env.py MEGALODON_ATTENTION_TILES triton mgpu
  # several switches at once: comma-separated names and values ("" leaves a switch unset)
  python experiments/gpu_checks/ab_attention_env.py \
      MEGALODON_ATTENTION_TILES_PERSISTENT,MEGALODON_ATTENTION_TILES_STAGES , 132,5 132,6

The switches (MEGALODON_ATTENTION_*) are read when the op is traced, so each value gets its own jitted
function, traced and compiled with the variable set; the timings then alternate A, B, A, B, ... so
that clock drift under sustained load hits both alike (separate bench_ops runs differ by ~4%).
Shape: bench_ops' attention (B=1, 16 chunks of 2048, 4 heads, dk 256, dv 2048, bf16).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import chunk_attention as ca


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("variable")
  parser.add_argument("values", nargs="+", help="two or more; comma-separated when the variable is")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  names = args.variable.split(",")
  if len(args.values) < 2 or any(len(value.split(",")) != len(names) for value in args.values):
    parser.error(f"give two or more values, each with {len(names)} comma-separated part(s), one per variable")
  batch, n_chunks, chunk, heads, dk, dv = 1, 16, 2048, 4, 256, 2048
  length = n_chunks * chunk
  keys = jax.random.split(jax.random.key(0), 4)
  q = (jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25).astype(jnp.bfloat16)
  k = (jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, length, heads, dv)).astype(jnp.bfloat16)
  d_out = jax.random.normal(keys[3], (batch, length, heads, dv)).astype(jnp.bfloat16)

  def make():
    def fwd_bwd(q, k, v, d_out):
      out, vjp = jax.vjp(lambda q, k, v: ca.chunk_attention(q, k, v, chunk_size=chunk), q, k, v)
      return out, *vjp(d_out)
    return jax.jit(fwd_bwd)

  fns = {}
  for value in args.values:
    for name, part in zip(names, value.split(",")):
      os.environ[name] = part
    fns[value] = make().lower(q, k, v, d_out).compile()  # traced with the variables set
  outs = {value: fn(q, k, v, d_out) for value, fn in fns.items()}
  a = outs[args.values[0]]
  diffs = [float(max(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) for y in ys))
           for x, *ys in zip(a, *(outs[value] for value in args.values[1:]))]
  times = {value: [] for value in args.values}
  for _ in range(args.rounds):
    for value, fn in fns.items():
      times[value].append(harness.time_fn(fn, q, k, v, d_out, warmup=2, iters=10, inner=3)["median_ms"])
  summary = {value: float(np.median(ts)) for value, ts in times.items()}
  print(f"{args.variable}: " + "  ".join(f"{value}: {ms:.3f} ms" for value, ms in summary.items())
        + f"  (rounds {times}; max |A - other| over out, dq, dk, dv: {diffs})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"variable": args.variable, "median_ms": summary, "rounds_ms": times, "max_abs_diff": diffs,
                 "device": jax.devices()[0].device_kind, "jax": jax.__version__}, f, indent=1)


if __name__ == "__main__":
  main()
