"""Normalised feed-forward network: LayerNorm -> (SwiGLU) MLP -> optional per-feature rescale."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from megalodon_jax.layers import initializers
from megalodon_jax.layers.norms import LayerNorm
from megalodon_jax.ops import dense as dense_ops
from megalodon_jax.sharding.rules import constrain, partitioned


class NormalizedFFN(nn.Module):
  """out = residual + alpha * W2 act(W1 LN(y)) (SPEC §1); act = silu, or silu(W1 u) * W3 u with swiglu.

  y, residual: [B, L, D]. Note the residual of Megalodon's second hop is the block input x, not y.
  """
  hidden_dim: int
  swiglu: bool = False
  rescale_init: float | None = None  # 0.1 * 0.5**layer_id when rescale_nffn
  eps: float = 1e-5
  dropout: float = 0.0
  hidden_dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, residual: jax.Array, deterministic: bool = True) -> jax.Array:
    dim = y.shape[-1]
    dense = lambda features, name, axes: nn.Dense(
        features, use_bias=False, kernel_init=partitioned(initializers.linear_kernel, axes), dtype=self.dtype,
        param_dtype=self.param_dtype, dot_general=dense_ops.dot_general, name=name)
    u = checkpoint_name(LayerNorm(self.eps, self.param_dtype, name="norm")(y), "ffn_norm_out")
    hidden = nn.silu(dense(self.hidden_dim, "fc1", ("embed", "mlp"))(u))
    if self.swiglu:
      hidden = hidden * dense(self.hidden_dim, "fc3", ("embed", "mlp"))(u)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.hidden_dropout)(hidden, deterministic=deterministic)
    out = dense(dim, "fc2", ("mlp", "embed"))(hidden)
    out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
    if self.rescale_init is not None:
      alpha = self.param("alpha", partitioned(nn.initializers.constant(self.rescale_init), ("embed",)), (dim,),
                         self.param_dtype)
      out = out * alpha.astype(out.dtype)
    return (out + residual).astype(residual.dtype)
