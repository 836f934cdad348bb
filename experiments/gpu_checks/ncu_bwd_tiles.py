"""Runs one backward-tiles kernel (Mosaic GPU or Triton) three times on host-made inputs, for ncu:

  ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats python experiments/gpu_checks/ncu_bwd_tiles.py --impl mgpu --block-k 128
  (add --persistent-ctas 132 for the persistent schedule)

Inputs come from numpy (no XLA kernels before the calls), so launches 0-2 are the three calls. The
values are random (lse from the row norms, so P stays finite); the timing does not depend on them.
Shape: the bench_ops attention shape (16 chunks of 2048, 4 heads, dk 256, dv 2048).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import bwd_tiles_mgpu as bt
from kernels_pallas import chunk_attention as ca


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--impl", choices=["mgpu", "triton"], default="mgpu")
  parser.add_argument("--block-k", type=int, default=128)
  parser.add_argument("--stages", type=int, default=4)
  parser.add_argument("--spans-per-program", type=int, default=1,
                      help="bwd_tiles_mgpu's spans_per_program (1: the op's default; 0: whole pair walks)")
  parser.add_argument("--persistent-ctas", type=int, default=None,
                      help="bwd_tiles_mgpu's persistent_ctas (e.g. 132, the H200's SM count; mgpu only)")
  args = parser.parse_args()
  batch, n_chunks, chunk, heads, dk, dv = 1, 16, 2048, 4, 256, 2048
  length = n_chunks * chunk
  rng = np.random.default_rng(0)
  def normal(width, scale=1.0):
    return jax.device_put((rng.normal(size=(batch, length, heads, width)) * scale).astype(jnp.bfloat16))
  q, k, v, d_out = normal(dk, dk ** -0.25), normal(dk, dk ** -0.25), normal(dv), normal(dv)
  lse = jax.device_put(np.full((batch, heads, length), 8.0, np.float32))
  delta = jax.device_put(rng.normal(size=(batch, heads, length)).astype(np.float32))
  if args.impl == "mgpu":
    spans = None if args.persistent_ctas or not args.spans_per_program else args.spans_per_program
    fn = jax.jit(lambda *a: bt.bwd_tiles_mgpu(*a, chunk=chunk, scale=1.0, block_k=args.block_k,
                                              stages=args.stages, persistent_ctas=args.persistent_ctas,
                                              spans_per_program=spans))
  else:
    plan = ca._triton_plan(ca.KernelConfig(), False, 1.0, batch, heads, n_chunks, chunk, chunk, dk, dv,
                           jnp.bfloat16)
    tiles_plan = dataclasses.replace(plan, geom=plan.bwd_geom)
    fn = jax.jit(lambda q, k, v, d_out, lse, delta: ca._tr_bwd_tiles(tiles_plan, q, k, v, None, lse, delta,
                                                                     d_out))
  for _ in range(3):
    jax.block_until_ready(fn(q, k, v, d_out, lse, delta))
  print("done", args.impl, args.block_k, args.persistent_ctas)


if __name__ == "__main__":
  main()
