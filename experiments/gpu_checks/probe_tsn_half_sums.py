"""Probe: tilings of the half-sequence sums of the split single-pass TimestepNorm
(kernels_pallas/timestep_norm_step_sums.py) on the GPU, against a read-only pass over the same bytes. One short call:

  python3 experiments/gpu_checks/probe_tsn_half_sums.py --json OUT.json

At B=1, L=32768, D=4096, G=64 bf16: tile_moments reads half of x, tile_adjoint_sums half of x and dy (plus the
saved statistics, 1/16 of that at K = 64). The floor row is XLA's sum over the same half of x and dy (a read-only
pass). Prints ms and TB/s per tiling, the errors of every tiling against the default's outputs, and writes JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import timestep_norm_step_sums as ss

TILINGS = ((64, 4, 4), (128, 4, 4), (64, 8, 4), (128, 8, 8), (32, 4, 4), (64, 2, 2), (128, 2, 4), (256, 2, 8))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--tilings", default=None, help="comma-separated TxGbxW (e.g. 64x4x4,32x4x4); default TILINGS")
  args = parser.parse_args()
  b, length, dim, groups = 1, 32768, 4096, 64
  half = length // 2
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = (0.3 + jax.random.normal(keys[0], (b, length, dim))).astype(jnp.bfloat16)
  dy = jax.random.normal(keys[1], (b, length, dim)).astype(jnp.bfloat16)
  w_hat = 1.0 + 0.1 * jax.random.normal(keys[2], (dim,))
  mu_run = 0.3 + 0.01 * jax.random.normal(keys[3], (2 * b, groups, half))
  rstd_run = 1.0 + 0.1 * jax.random.uniform(keys[4], (2 * b, groups, half))
  n_mid, mu_mid = jnp.full((b,), 1000.0 + half), jnp.full((b, groups), 0.3)
  x_bytes = b * half * dim * x.dtype.itemsize
  stats_bytes = 2 * b * groups * half * 4
  rows = []

  def record(name, fn, args_, nbytes, outputs=None, reference=None):
    t = harness.time_fn(fn, *args_, warmup=3, iters=20, inner=5)["median_ms"]
    row = {"name": name, "median_ms": t, "tb_per_s": nbytes / t / 1e9}
    if outputs is not None and reference is not None:
      row["max_rel_err_vs_default"] = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r)))
                                          for o, r in zip(outputs, reference))
    rows.append(row)
    print(f"{name:36s} {t:.4f} ms  {row['tb_per_s']:.2f} TB/s  " + (
        f"err {row['max_rel_err_vs_default']:.1e}" if "max_rel_err_vs_default" in row else ""), flush=True)

  floor_x = jax.jit(lambda x: jnp.sum(x[:, :half].astype(jnp.float32), axis=(0, 1)))
  floor_xdy = jax.jit(lambda x, dy: jnp.sum(x[:, half:].astype(jnp.float32) * 0.5 + dy[:, half:], axis=(0, 1)))
  record("floor: xla read half x", floor_x, (x,), x_bytes)
  record("floor: xla read half x, dy", floor_xdy, (x, dy), 2 * x_bytes)
  ref_m = ref_a = None
  tilings = TILINGS if not args.tilings else [tuple(int(v) for v in s.split("x")) for s in args.tilings.split(",")]
  for t, gb, warps in tilings:
    tiling = ss.Tiling(block_t=t, block_groups=gb, num_warps=warps)
    name = f"T{t} Gb{gb} w{warps}"
    try:
      fm = jax.jit(lambda x, tiling=tiling: ss.tile_moments(x, num_groups=groups, tiling=tiling))
      fa = jax.jit(lambda x, dy, tiling=tiling: ss.tile_adjoint_sums(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid,
                                                                     num_groups=groups, tiling=tiling))
      # Sums over the tiles (what the single pass uses), comparable across tilings.
      om = [jnp.mean(o, axis=1) for o in fm(x)]
      oa = [jnp.sum(o, axis=1) for o in fa(x, dy)]
      ref_m, ref_a = ref_m or om, ref_a or oa
      record("moments " + name, fm, (x,), x_bytes, om, ref_m)
      record("adjoint " + name, fa, (x, dy), 2 * x_bytes + stats_bytes, oa, ref_a)
    except Exception as e:  # noqa: BLE001 -- a tiling that does not compile is a result too
      rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
      print(f"{name:36s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": [b, length, dim, groups],
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
