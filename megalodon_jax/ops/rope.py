"""Rotary position embedding with positions that restart at every chunk and every document.

The release rotates adjacent pairs (x[2i], x[2i+1]) as one complex number by pos * base^(-2i/d),
with positions counted from the start of each attention chunk (SPEC §4). With packed sequences
positions also restart where a new document (segment) begins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """[head_dim // 2] float32 angular frequencies base^(-2i/head_dim) (the release's `rope.freqs`)."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def segment_starts(segment_ids: jax.Array) -> jax.Array:
  """segment_ids: [B, L] -> [B, L] int32 index of the first step of each step's segment.

  A segment is a maximal run of equal ids, so ids need not be increasing.
  """
  length = segment_ids.shape[-1]
  steps = jnp.arange(length, dtype=jnp.int32)
  new = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], dtype=bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return jax.lax.cummax(jnp.where(new, steps, 0), axis=segment_ids.ndim - 1)


def chunk_positions(length: int, chunk_size: int, segment_ids: jax.Array | None = None,
                    offset: int | jax.Array = 0) -> jax.Array:
  """Positions within each chunk, restarting at documents: [1, L] or [B, L] int32.

  offset: position of the first step inside its chunk (decoding continues a partial chunk).
  """
  steps = jnp.arange(length, dtype=jnp.int32) + offset
  positions = (steps % chunk_size)[None, :]
  if segment_ids is not None:
    chunk_start = steps - steps % chunk_size
    start = jnp.maximum(segment_starts(segment_ids) + offset, chunk_start[None, :])
    positions = steps[None, :] - start
  return positions


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """x: [B, L, H, d] (d even); positions: [B or 1, L] -> rotated x, same dtype.

  The rotation is computed in float32, as in the release.
  """
  head_dim = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, base)  # [B, L, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
  real, imag = xf[..., 0], xf[..., 1]
  out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
