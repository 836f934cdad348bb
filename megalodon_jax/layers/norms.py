"""RMSNorm / LayerNorm modules; the scale is stored as an offset from 1 (zero init)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from megalodon_jax.ops import norms
from megalodon_jax.sharding.rules import partitioned


class RMSNorm(nn.Module):
  """x: [..., D] -> RMS-normalised x * (weight + 1)."""
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", partitioned(nn.initializers.zeros, ("embed",)), (x.shape[-1],), self.param_dtype)
    return norms.rms_norm(x, weight, self.eps)


class LayerNorm(nn.Module):
  """x: [..., D] -> layer-normalised x * (weight + 1) + bias."""
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    weight = self.param("weight", partitioned(nn.initializers.zeros, ("embed",)), (dim,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (dim,), self.param_dtype)
    return norms.layer_norm(x, weight, bias, self.eps)
