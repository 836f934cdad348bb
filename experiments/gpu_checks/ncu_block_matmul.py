"""Runs one block-causal matmul (Mosaic GPU or Triton) three times on host-made inputs, for ncu:

  ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats python experiments/gpu_checks/ncu_block_matmul.py --impl mgpu

Inputs come from numpy (no XLA kernels before the calls), so launches 0-2 are the three calls.
P~ is random in [0, 1) (the timing does not depend on the values); shape as the probe's part 2.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import block_matmul_mgpu as bm
from kernels_pallas import chunk_attention as ca


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--impl", choices=["mgpu", "triton"], default="mgpu")
  parser.add_argument("--stages", type=int, default=3)
  args = parser.parse_args()
  batch, n_chunks, chunk, heads, dv = 1, 16, 2048, 4, 2048
  length = n_chunks * chunk
  rng = np.random.default_rng(0)
  p_buf = jax.device_put(rng.random((batch, heads, length, chunk), np.float32).astype(jnp.bfloat16))
  v = jax.device_put(rng.normal(size=(batch, length, heads, dv)).astype(jnp.bfloat16))
  rscale = jax.device_put(rng.random((batch, heads, length), np.float32))
  if args.impl == "mgpu":
    fn = jax.jit(lambda p, x, r: bm.block_causal_matmul_mgpu(p, x, r, chunk=chunk, block=128, block_d=256,
                                                             stages=args.stages))
  else:
    config = ca.KernelConfig(block_q=128, block_k=128, mm_block_k=64, fwd_scores="twopass")
    plan = ca._triton_plan(config, False, 1.0, batch, heads, n_chunks, chunk, chunk, 256, dv, jnp.bfloat16)
    mm_plan = dataclasses.replace(plan, geom=plan.mm_geom)
    fn = jax.jit(lambda p, x, r: ca._tr_block_matmul(mm_plan, p, x, None, None, jnp.bfloat16, r))
  for _ in range(3):
    jax.block_until_ready(fn(p_buf, v, rscale))
  print("done", args.impl)


if __name__ == "__main__":
  main()
