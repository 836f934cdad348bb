"""Moving-average gated attention, the first hop of a Megalodon block (SPEC §1)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from megalodon_jax.cache import LayerCache
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.layers import initializers
from megalodon_jax.layers.cema import CEMA
from megalodon_jax.layers.norms import RMSNorm
from megalodon_jax.layers.timestep_norm import TimestepNorm
from megalodon_jax.ops import attention, backend, norms, rope
from megalodon_jax.ops import dense as dense_ops
from megalodon_jax.sharding import sequence_parallel
from megalodon_jax.sharding.rules import constrain, partitioned


class MovingAverageGatedAttention(nn.Module):
  """x: [B, L, D] -> (h + x, new layer cache or None).

  TimestepNorm -> CEMA -> RMSNorm gives mx; q/k come from a shared normalised projection of mx,
  v from the TimestepNorm output, r gates the attention output; chunked attention without scaling.
  """
  config: MegalodonConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: LayerCache | None = None, cache_count: jax.Array | None = None,
               deterministic: bool = True):
    """positions: [1 or B, L] RoPE positions; cache/cache_count: decoding state (see cache.py)."""
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch, length, _ = x.shape
    heads, dz, dv = cfg.num_heads, cfg.z_head_dim, cfg.v_head_dim
    def dense(features, name, axes, bias=True):
      return nn.Dense(features, use_bias=bias, kernel_init=partitioned(initializers.linear_kernel, axes),
                      bias_init=partitioned(nn.initializers.zeros, axes[1:]), dtype=dtype, param_dtype=pdtype,
                      dot_general=dense_ops.dot_general, name=name)
    dropout = lambda rate, t: nn.Dropout(rate)(t, deterministic=deterministic)

    padding_mask = None if segment_ids is None else segment_ids == 0
    x_tsn, norm_state = TimestepNorm(cfg.norm_num_groups, cfg.norm_eps, backend.timestep_norm_method(cfg.timestep_norm_impl, length),
                                     pdtype, name="timenorm")(
        x, None if cache is None else cache.norm, padding_mask=padding_mask, segment_ids=segment_ids)
    x_tsn = checkpoint_name(x_tsn, "tsn_out")  # names: what remat policies may keep (model.py)
    cema = CEMA(cfg.cema_ndim, backend.cema_method(cfg.cema_method, length),
                cfg.cema_chunk, pdtype, name="cema")
    if cache is None:
      x_cema, cema_state = cema(x_tsn, segment_ids=segment_ids), None
    else:
      x_cema, cema_state = cema(x_tsn, cache.cema, segment_ids=segment_ids, return_state=True)
    x_cema = checkpoint_name(x_cema, "cema_out")  # lets remat policies keep it (the costly scan)
    mx = checkpoint_name(RMSNorm(cfg.norm_eps, pdtype, name="rmsnorm")(x_cema).astype(dtype), "cema_norm_out")
    mx = constrain(mx, ("batch", "length", "act_embed"))
    mx = dropout(cfg.hidden_dropout, mx)

    # Shared representation z -> q, k: per-head RMS normalisation, then per-feature affine maps.
    z = dense(cfg.z_dim, "wz", ("embed", "qk"))(mx).reshape(batch, length, heads, dz)
    z = checkpoint_name(norms.rms_norm(z.astype(jnp.float32), None, cfg.norm_eps), "qk_norm_out")
    affine_init = partitioned(nn.initializers.zeros, (None, "qk"))
    gamma = self.param("gamma", affine_init, (2, cfg.z_dim), pdtype).reshape(2, heads, dz)
    beta = self.param("beta", affine_init, (2, cfg.z_dim), pdtype).reshape(2, heads, dz)
    scale = (gamma.astype(jnp.float32) + 1.0) / math.sqrt(dz)
    q = (z * scale[0] + beta[0]).astype(dtype)
    k = (z * scale[1] + beta[1]).astype(dtype)
    q = rope.apply_rope(q, positions, cfg.rope_base)
    k = rope.apply_rope(k, positions, cfg.rope_base)
    v = nn.silu(dense(cfg.value_dim, "wv", ("embed", "value"))(x_tsn)).reshape(batch, length, heads, dv)
    r = nn.silu(dense(cfg.value_dim, "wr", ("embed", "value"))(mx))
    heads_layout = ("batch", "length", "heads", None)
    q, k, v = (constrain(t, heads_layout) for t in (q, k, v))

    new_cache = None
    if cache is None or length % cfg.chunk_size == 0:
      # Training, or whole chunks from a chunk boundary (prefill): the buffers end up empty.
      rng = self.make_rng("dropout") if cfg.attention_dropout > 0 and not deterministic else None
      attn = sequence_parallel.chunked_attention(
          q, k, v, chunk_size=cfg.chunk_size, segment_ids=segment_ids, impl=cfg.attention_impl,
          dropout_rate=0.0 if deterministic else cfg.attention_dropout, dropout_rng=rng)
      if cache is not None:
        new_cache = LayerCache(cache.key, cache.value, cema_state, norm_state)
    else:
      # Steps inside the current chunk: append the new keys/values, attend to the chunk so far.
      start = (0, cache_count, 0, 0)
      key = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start)
      value = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start)
      attn = attention.cached_attention(q, key, value, cache_count, impl=cfg.attention_impl)
      new_cache = LayerCache(key, value, cema_state, norm_state)

    attn = checkpoint_name(attn, "attention_out")
    attn = dropout(cfg.hidden_dropout, attn.reshape(batch, length, cfg.value_dim) * r)
    attn = constrain(attn, ("batch", "length", "value"))  # V over tensor: wh2 is row-parallel
    h = (dense(cfg.model_dim, "wh1", ("embed_tensor", "embed"))(mx)
         + dense(cfg.model_dim, "wh2", ("value", "embed"), bias=False)(attn))
    h = dropout(cfg.dropout, h)
    # Named so remat_policy "recompute_elementwise" stores this sum (the FFN's LayerNorm input)
    # rather than the two projections it is made of (model.STORED_NAMES).
    return checkpoint_name((h + x).astype(x.dtype), "mega_out"), new_cache
