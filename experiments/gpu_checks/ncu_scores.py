"""Runs the Mosaic GPU forward scores kernel three times on host-made inputs, for ncu:

  ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats python experiments/gpu_checks/ncu_scores.py

Inputs, the bound included, come from numpy (no XLA kernels before the calls), so launches 0-2 are
the three calls. Shape: the bench_ops attention shape (16 chunks of 2048, 4 heads, dk 256), bounded
scores (the op's default fwd_scores).
"""

from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import scores_mgpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", type=int, default=6)
  args = parser.parse_args()
  batch, n_chunks, chunk, heads, dk = 1, 16, 2048, 4, 256
  length = n_chunks * chunk
  rng = np.random.default_rng(0)
  q_np = (rng.normal(size=(batch, length, heads, dk)) * dk ** -0.25).astype(np.float32)
  k_np = (rng.normal(size=(batch, length, heads, dk)) * dk ** -0.25).astype(np.float32)
  # _score_bound in numpy: |q_r| max over the chunk's keys |k| * scale * log2 e, with its headroom
  k_max = np.linalg.norm(k_np, axis=-1).reshape(batch, n_chunks, chunk, heads).max(axis=2)
  q_norm = np.linalg.norm(q_np, axis=-1).reshape(batch, n_chunks, chunk, heads)
  bound = (q_norm * k_max[:, :, None, :] * np.log2(np.e)) * (1.0 + 1e-3) + 1e-3
  bound = jax.device_put(bound.reshape(batch, length, heads).transpose(0, 2, 1).astype(np.float32))
  q, k = jax.device_put(q_np.astype(jnp.bfloat16)), jax.device_put(k_np.astype(jnp.bfloat16))
  fn = jax.jit(lambda q, k, bound: scores_mgpu.chunk_scores_mgpu(q, k, bound, chunk=chunk, scale=1.0,
                                                                 stages=args.stages))
  for _ in range(3):
    jax.block_until_ready(fn(q, k, bound))
  print("ran the scores kernel 3 times")


if __name__ == "__main__":
  main()
