"""Flax wrapper of the complex EMA: owns the release's parameters, calls ops.cema."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_jax.layers import initializers
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.sharding import sequence_parallel
from megalodon_jax.sharding.rules import partitioned


class CEMA(nn.Module):
  """Multi-head complex EMA over [batch, length, dim]; output float32 (SPEC §2).

  Parameters (release shapes): alpha, delta [D, N, 1]; theta [D, 1, 1]; gamma [D, N, 2]; omega [D, 1].
  """
  ndim: int = 16
  method: str = "chunked"
  chunk: int = 64
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               return_state: bool = False):
    """x: [B, L, D]; h0: [B, D, N] complex64 -> y [B, L, D] float32 (and h_last [B, D, N])."""
    dim, n = x.shape[-1], self.ndim
    per_order = ("embed", "cema_order", None)
    alpha = self.param("alpha", partitioned(initializers.normal(0.2), per_order), (dim, n, 1), self.param_dtype)
    delta = self.param("delta", partitioned(initializers.normal(0.2), per_order), (dim, n, 1), self.param_dtype)
    theta = self.param("theta", partitioned(initializers.cema_theta, ("embed", None, None)), (dim, 1, 1),
                       self.param_dtype)
    gamma = self.param("gamma", partitioned(initializers.cema_gamma, per_order), (dim, n, 2), self.param_dtype)
    omega = self.param("omega", partitioned(initializers.cema_omega, ("embed", None)), (dim, 1), self.param_dtype)
    coeffs = cema_ops.cema_coefficients(alpha, delta, theta, gamma)
    # Same as ops.cema.cema on one device; sequence-parallel under an active sharding.Parallelism.
    return sequence_parallel.cema(x, coeffs, omega.reshape(dim), h0, method=self.method, segment_ids=segment_ids,
                                  return_state=return_state, chunk=self.chunk)
