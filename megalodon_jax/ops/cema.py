"""Complex exponential moving average (CEMA, SPEC §2): coefficients and evaluation paths.

Per channel d and order n:  h_t = q * h_{t-1} + p * x_t  (complex state),
y_t = Re(sum_n eta_n h_t,n) + omega_d x_t.  All math runs in float32 / complex64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class CemaCoefficients(NamedTuple):
  """p: [D, N] float32 input scale; q: [D, N] complex64 decay (|q| < 1); eta: [D, N] complex64."""
  p: jax.Array
  q: jax.Array
  eta: jax.Array


def cema_coefficients(alpha: jax.Array, delta: jax.Array, theta: jax.Array,
                      gamma: jax.Array) -> CemaCoefficients:
  """Coefficients from the stored parameters.

  alpha, delta: [D, N, 1] (or [D, N]); theta: [D, 1, 1] (or [D]); gamma: [D, N, 2] (real, imag).
  p = sigmoid(alpha); q = (1 - sigmoid(alpha) sigmoid(delta)) exp(i n phi_d) with
  phi_d = sigmoid(theta_d) 2 pi / N, n = 1..N; eta = (gamma_re + i gamma_im) / sqrt(N).
  """
  dim, ndim = gamma.shape[0], gamma.shape[1]
  alpha = jax.nn.sigmoid(alpha.astype(jnp.float32).reshape(dim, ndim))
  delta = jax.nn.sigmoid(delta.astype(jnp.float32).reshape(dim, ndim))
  phi = jax.nn.sigmoid(theta.astype(jnp.float32).reshape(dim, 1)) * (2.0 * math.pi / ndim)
  angle = phi * jnp.arange(1, ndim + 1, dtype=jnp.float32)[None, :]
  magnitude = 1.0 - alpha * delta
  q = jax.lax.complex(magnitude * jnp.cos(angle), magnitude * jnp.sin(angle))
  gamma = gamma.astype(jnp.float32) / math.sqrt(ndim)
  eta = jax.lax.complex(gamma[..., 0], gamma[..., 1])
  return CemaCoefficients(p=alpha, q=q, eta=eta)
