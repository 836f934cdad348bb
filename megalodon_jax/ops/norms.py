"""RMSNorm and LayerNorm with the release's stored-offset convention (scale applied as stored + 1).

Statistics are computed in float32 whatever the input dtype; the result has the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
  """x: [..., D]; weight: [D] stored offset (applied as weight + 1) or None (no affine)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * (weight.astype(jnp.float32) + 1.0)
  return y.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None,
               eps: float = 1e-5) -> jax.Array:
  """x: [..., D]; weight, bias: [D] (weight a stored offset, applied as weight + 1)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centered = xf - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  y = centered * jax.lax.rsqrt(var + eps)
  if weight is not None:
    y = y * (weight.astype(jnp.float32) + 1.0)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
