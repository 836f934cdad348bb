"""The CEMA problem the GPU checks share: bench_ops' shape (B=1, L=32768, D=4096, N=16, bf16 x) or,
for CPU smoke runs, a tiny one with a config the interpreter runs quickly."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import cema as K
from megalodon_jax.ops.cema import CemaCoefficients, cema_coefficients


class CemaProblem(NamedTuple):
  x: jax.Array              # [B, L, D] bf16
  coeffs: CemaCoefficients  # [D, N]
  omega: jax.Array          # [D]
  w: jax.Array              # [B, L, D] float32: the checks differentiate sum(w * y)
  config: K.CemaKernelConfig
  shape: tuple[int, int, int, int]  # (B, L, D, N)


def benchmark_problem(smoke: bool = False) -> CemaProblem:
  batch, length, dim, ndim = (1, 96, 8, 4) if smoke else (1, 32768, 4096, 16)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (batch, length, dim), jnp.float32).astype(jnp.bfloat16)
  coeffs = cema_coefficients(jax.random.normal(keys[1], (dim, ndim, 1)), jax.random.normal(keys[2], (dim, ndim, 1)),
                             jax.random.normal(keys[3], (dim, 1, 1)), 0.5 * jax.random.normal(keys[4], (dim, ndim, 2)))
  omega = jax.random.normal(keys[5], (dim,))
  w = jax.random.normal(jax.random.key(1), (batch, length, dim), jnp.float32)
  config = K.default_config(batch, length, dim, ndim)
  if smoke:
    config = dataclasses.replace(config, block_d=4, bwd_block_d=4, num_warps=1, bwd_num_warps=1, num_chunks=3)
  return CemaProblem(x, coeffs, omega, w, config, (batch, length, dim, ndim))
