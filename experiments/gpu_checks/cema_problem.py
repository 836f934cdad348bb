"""The CEMA problem the GPU checks share: bench_ops' shape (B=1, L=32768, D=4096, N=16, bf16 x) or,
for CPU smoke runs, a tiny one with a config the interpreter runs quickly."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def fwd_bwd_program(config: K.CemaKernelConfig, w: jax.Array):
  """One jitted forward + backward of cema_pallas under `config`: (x, coeffs, omega) -> (y, the
  gradients of sum(w * y)). A fresh function each call, so each gets its own trace and compile."""
  def value_and_grads(x, coeffs, omega):
    y, vjp = jax.vjp(lambda x, c, om: K.cema_pallas(x, c, om, config=config), x, coeffs, omega)
    return y, vjp(w.astype(y.dtype))
  return jax.jit(value_and_grads)


def as_float64(outputs) -> list[np.ndarray]:
  """Every leaf as a float64 (or complex128) numpy array, for comparisons."""
  return [np.asarray(v, np.complex128 if jnp.iscomplexobj(v) else np.float64)
          for v in jax.tree_util.tree_leaves(outputs)]


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  """Largest |a - b| over the largest |b|."""
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def interleaved_medians(programs: dict, args: tuple, rounds: int) -> dict[str, dict]:
  """Times every program in `rounds` interleaved rounds (each round: 5 samples of 10 calls, median),
  so that clock drift under sustained load hits all alike. Returns label -> {median_ms, rounds_ms}."""
  from experiments.benchmarks import harness

  samples = {label: [] for label in programs}
  for _ in range(rounds):
    for label, fn in programs.items():
      samples[label].append(harness.time_fn(fn, *args, warmup=1, iters=5, inner=10)["median_ms"])
  return {label: {"median_ms": float(np.median(values)), "rounds_ms": values} for label, values in samples.items()}
