"""Compiles the CEMA kernels' forward and backward ahead of time, then runs them --calls times,
for a profiler to watch:

    ncu --clock-control none --launch-count 60 \
        --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        python experiments/gpu_checks/profile_cema.py --length 32768

With --lock FILE the calls wait for an exclusive lock on FILE (check_cema.py --parallel uses one,
so a sweep's timings and this profile do not overlap).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import cema as K  # noqa: E402
from megalodon_jax.ops.cema import cema_coefficients  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--order", type=int, default=16)
  parser.add_argument("--config", default="{}", help="CemaKernelConfig overrides, as a dict")
  parser.add_argument("--lock", default=None)
  parser.add_argument("--calls", type=int, default=1)
  args = parser.parse_args()
  import ast
  overrides = ast.literal_eval(args.config)
  cfg = dataclasses.replace(K.default_config(1, args.length, args.dim, args.order), **overrides)
  print(cfg, flush=True)
  rng = np.random.default_rng(0)
  dim, ndim = args.dim, args.order
  params = {
      "alpha": jnp.asarray(rng.normal(0, 0.2, (dim, ndim, 1)), jnp.float32),
      "delta": jnp.asarray(rng.normal(0, 0.2, (dim, ndim, 1)), jnp.float32),
      "theta": jnp.asarray(rng.normal(-3, 1, (dim, 1, 1)), jnp.float32),
      "gamma": jnp.asarray(rng.normal(size=(dim, ndim, 2)) * [1, 0], jnp.float32),
      "omega": jnp.asarray(rng.normal(0, 0.25, (dim, 1)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(1, args.length, dim)), jnp.bfloat16)

  def loss(x, params):
    coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"],
                               params["gamma"])
    return jnp.sum(K.cema_pallas(x, coeffs, params["omega"], config=cfg))

  step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, params).compile()
  print("compiled", flush=True)
  lock = open(args.lock, "a") if args.lock else contextlib.nullcontext()
  with lock:
    if args.lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
    for _ in range(args.calls):
      jax.block_until_ready(step(x, params))
  print("profiled calls done", flush=True)


if __name__ == "__main__":
  main()
