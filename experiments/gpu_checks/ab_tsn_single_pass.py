"""Interleaved A/B of TimestepNorm fwd+bwd: the single-pass Mosaic GPU kernels (the default, which splits each
sequence in two halves run at once where that fits, and unsplit) against the two-pass Triton kernels, one process (separate bench_ops runs of the single pass read 0.673-0.827 ms on different allocations).

  python3 experiments/gpu_checks/ab_tsn_single_pass.py --rounds 10 --json OUT.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import timestep_norm as tsn_kernel
from kernels_pallas import timestep_norm_single_pass as single
from megalodon_jax.ops import timestep_norm as tsn_ops


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  b, length, dim, groups = 1, 32768, 4096, 64
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (b, length, dim), jnp.bfloat16)
  w = 0.1 * jax.random.normal(keys[1], (dim,))
  bias = 0.1 * jax.random.normal(keys[2], (dim,))
  dy = jax.random.normal(keys[3], (b, length, dim), jnp.bfloat16)
  state = tsn_ops.initial_state(b, groups)
  impls = {
      "single_pass": lambda x, w, bb: single.timestep_norm_single_pass(x, w, bb, state, num_groups=groups, eps=1e-5)[0],
      "single_pass_unsplit": lambda x, w, bb: single.timestep_norm_single_pass(x, w, bb, state, num_groups=groups,
                                                                               eps=1e-5, splits=1)[0],
      "two_pass": lambda x, w, bb: tsn_kernel.timestep_norm_pallas(x, w, bb, num_groups=groups, eps=1e-5,
                                                                   config=tsn_kernel.default_config("triton"))[0],
  }
  fns = {}
  for name, fn in impls.items():
    def fwd_bwd(x, w, bb, fn=fn):
      y, vjp = jax.vjp(fn, x, w, bb)
      return y, vjp(dy)
    fns[name] = jax.jit(fwd_bwd)
    jax.block_until_ready(fns[name](x, w, bias))
  rounds = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      rounds[name].append(harness.time_fn(fn, x, w, bias, warmup=1, iters=5, inner=3)["median_ms"])
  result = {name: float(np.median(v)) for name, v in rounds.items()}
  print(" ".join(f"{n}: {v:.3f} ms" for n, v in result.items()), "rounds", rounds)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "median_ms": result, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
  main()
