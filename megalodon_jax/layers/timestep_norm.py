"""Flax wrapper of TimestepNorm (causal cumulative group norm, SPEC §3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_jax.ops import timestep_norm as tsn_ops
from megalodon_jax.sharding import sequence_parallel
from megalodon_jax.sharding.rules import partitioned


class TimestepNorm(nn.Module):
  """x: [B, L, D] -> (y [B, L, D] in x.dtype, new state). weight/bias: [D], zero init (+1 offset)."""
  num_groups: int
  eps: float = 1e-5
  method: str = "associative"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, state: tsn_ops.TimestepNormState | None = None, *,
               padding_mask: jax.Array | None = None, segment_ids: jax.Array | None = None):
    dim = x.shape[-1]
    weight = self.param("weight", partitioned(nn.initializers.zeros, ("embed",)), (dim,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (dim,), self.param_dtype)
    # Same as ops.timestep_norm on one device; sequence-parallel under an active sharding.Parallelism.
    return sequence_parallel.timestep_norm(x, weight, bias, num_groups=self.num_groups, eps=self.eps, state=state,
                                           padding_mask=padding_mask, segment_ids=segment_ids, method=self.method)
