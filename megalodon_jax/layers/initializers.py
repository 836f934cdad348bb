"""Initialisers of the release (SPEC §2, §6), as Flax initialiser functions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# kaiming_normal(a=sqrt(5)) on a fan_in-sized input: std = sqrt(2 / (1 + 5)) / sqrt(fan_in).
linear_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "normal")


def truncated_normal(stddev: float, bound_in_stds: float):
  """N(0, stddev) truncated to [-bound, bound] * stddev (torch's trunc_normal_, no variance fix)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -bound_in_stds, bound_in_stds, shape, jnp.float32).astype(dtype) * stddev

  return init


def embedding(dim: int):
  """Embedding and output head: std 1/sqrt(D) truncated at 3 std."""
  return truncated_normal(1.0 / math.sqrt(dim), 3.0)


def normal(stddev: float):
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * stddev).astype(dtype)
  return init


def cema_theta(key, shape, dtype=jnp.float32):
  """theta: [D, 1, 1] = logit(f), f a random permutation of exp(-k ln(D) / D), k = 1..D.

  The permutation comes from the key, so every host with the same key gets the same one.
  """
  dim = shape[0]
  k = jnp.arange(1, dim + 1, dtype=jnp.float32)
  freqs = jnp.exp(-k * (math.log(dim) / dim))
  freqs = jax.random.permutation(key, freqs)
  return jnp.log(freqs / (1.0 - freqs)).reshape(shape).astype(dtype)


def cema_gamma(key, shape, dtype=jnp.float32):
  """gamma: [D, N, 2] with real part N(0, 1) and imaginary part 0."""
  real = jax.random.normal(key, shape[:-1] + (1,), jnp.float32)
  return jnp.concatenate([real, jnp.zeros_like(real)], axis=-1).astype(dtype)


cema_omega = truncated_normal(0.25, 4.0)  # truncated N(0, 0.25) on [-1, 1]
