"""Decoding cache (SPEC §5): constant memory per sequence, whatever the number of tokens seen.

Per layer: keys/values of the current, unfinished chunk (a fixed buffer of C steps), the CEMA state
and the TimestepNorm state; plus the output TimestepNorm state and the number of steps already in
the current chunk (the same for every layer and every sequence of the batch).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.ops.timestep_norm import TimestepNormState, initial_state


class LayerCache(NamedTuple):
  """key: [B, C, H, dk]; value: [B, C, H, dv]; cema: [B, D, N] complex64; norm: TimestepNormState."""
  key: jax.Array
  value: jax.Array
  cema: jax.Array
  norm: TimestepNormState


class ModelCache(NamedTuple):
  """layers: a tuple of LayerCache (or one LayerCache stacked on a leading layer axis when the
  model scans its layers); final_norm: the output TimestepNorm state; count: [] int32, steps
  already in the current chunk (0 <= count < C)."""
  layers: tuple[LayerCache, ...] | LayerCache
  final_norm: TimestepNormState
  count: jax.Array


def init_layer_cache(config: MegalodonConfig, batch: int) -> LayerCache:
  dtype = jnp.dtype(config.dtype)
  c, h = config.chunk_size, config.num_heads
  return LayerCache(
      key=jnp.zeros((batch, c, h, config.z_head_dim), dtype),
      value=jnp.zeros((batch, c, h, config.v_head_dim), dtype),
      cema=jnp.zeros((batch, config.model_dim, config.cema_ndim), jnp.complex64),
      norm=initial_state(batch, config.norm_num_groups))


def init_cache(config: MegalodonConfig, batch: int) -> ModelCache:
  """An empty cache for `batch` sequences (no tokens seen)."""
  layers = tuple(init_layer_cache(config, batch) for _ in range(config.num_layers))
  if config.scan_layers:
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return ModelCache(layers=layers, final_norm=initial_state(batch, config.norm_num_groups),
                    count=jnp.zeros((), jnp.int32))


def cache_bytes(cache: ModelCache) -> int:
  """Bytes held by a cache: a function of batch and config only, never of tokens decoded."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
