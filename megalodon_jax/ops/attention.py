"""Chunked causal softmax attention (SPEC §4): the plain-XLA path, reference for the Pallas kernel.

The sequence is cut into chunks of C steps; a query sees only the keys of its own chunk at or
before it (and, with packed sequences, only keys of its own segment). Scores are NOT scaled by
1/sqrt(d): Megalodon normalises q and k itself (scale = 1.0). Softmax runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megalodon_jax.config import ConfigError


def num_chunks(length: int, chunk_size: int) -> tuple[int, int]:
  """(number of chunks, chunk length) for a sequence of `length` steps."""
  if length <= chunk_size:
    return 1, length
  if length % chunk_size:
    raise ConfigError(
        f"sequence length {length} is longer than chunk_size={chunk_size} but not a multiple of it; "
        f"pad it to {(length // chunk_size + 1) * chunk_size} (segment id 0) or use chunk_size >= {length}")
  return length // chunk_size, chunk_size


def _check_qkv(q, k, v):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(
        "expected q, k: [batch, length, heads, qk_dim] of equal shape and v: [batch, length, heads, v_dim], "
        f"got q{q.shape} k{k.shape} v{v.shape}")


def chunked_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
                          segment_ids: jax.Array | None = None, scale: float = 1.0,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """q, k: [B, L, H, dk]; v: [B, L, H, dv]; segment_ids: [B, L] int -> [B, L, H, dv] in v.dtype."""
  _check_qkv(q, k, v)
  batch, length, heads, _ = q.shape
  n, c = num_chunks(length, chunk_size)
  split = lambda t: t.reshape(batch, n, c, heads, t.shape[-1])
  qc, kc, vc = split(q), split(k), split(v)
  scores = jnp.einsum("bnqhd,bnkhd->bnhqk", qc, kc, preferred_element_type=jnp.float32)
  if scale != 1.0:
    scores = scores * scale
  mask = jnp.tril(jnp.ones((c, c), dtype=bool))[None, None, None]
  if segment_ids is not None:
    seg = segment_ids.reshape(batch, n, c)
    mask = mask & (seg[:, :, None, :, None] == seg[:, :, None, None, :])
  scores = jnp.where(mask, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention dropout needs dropout_rng")
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs.astype(v.dtype), vc)
  return out.reshape(batch, length, heads, v.shape[-1])


def cached_attention_xla(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, start: jax.Array | int,
                         scale: float = 1.0) -> jax.Array:
  """Attention of T new queries to the keys of the current chunk (decoding / prefill).

  q: [B, T, H, dk] at chunk positions start..start+T-1; k_buf: [B, C, H, dk], v_buf: [B, C, H, dv]
  already hold the new keys/values at [start, start+T). Entries past start+T-1 are stale and
  masked out. Returns [B, T, H, dv].
  """
  steps = q.shape[1]
  query_pos = start + jnp.arange(steps)
  if steps == 1:
    # One query: per head a row times a matrix, which XLA on GPU turns into a slow multiply and
    # reduction (see ops/dense.py); the query twice makes both products real matrix products.
    q = jax.lax.optimization_barrier(jnp.concatenate([q, q], axis=1))
    query_pos = jnp.concatenate([query_pos, query_pos])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_buf, preferred_element_type=jnp.float32)
  if scale != 1.0:
    scores = scores * scale
  mask = jnp.arange(k_buf.shape[1])[None, :] <= query_pos[:, None]
  scores = jnp.where(mask[None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v_buf.dtype), v_buf)[:, :steps]


PALLAS_MIN_CACHED_QUERIES = 16


def _pallas_available() -> bool:
  """Whether 'auto' takes the kernels: on a TPU, or on a GPU that can run Pallas' Triton kernels."""
  from megalodon_jax.ops import backend  # the one place that decides (and warns once on a GPU)
  return backend.has_accelerator()


def _kernel_takes(dk: int, dv: int) -> bool:
  """'auto' on a GPU: the compiled kernels' products need head dims >= 16 (smaller ones go to XLA)."""
  if jax.default_backend() != "gpu":
    return True
  from kernels_pallas import chunk_attention as kernel
  return kernel.gpu_head_dims_supported(dk, dv)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
                      segment_ids: jax.Array | None = None, impl: str = "auto",
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Dispatches between the XLA path and the Pallas kernel. Shapes as `chunked_attention_xla`.

  impl: 'xla', 'pallas' (error if unavailable) or 'auto' (Pallas on GPU/TPU when no attention
  dropout is asked for, XLA otherwise).
  """
  use_pallas = impl == "pallas" or (impl == "auto" and dropout_rate == 0.0 and _pallas_available()
                                    and _kernel_takes(q.shape[-1], v.shape[-1]))
  if use_pallas:
    if dropout_rate > 0.0:
      raise ConfigError("the Pallas attention kernel has no attention dropout; set attention_impl='xla' "
                        "or attention_dropout=0")
    from kernels_pallas import chunk_attention as kernel
    return kernel.chunk_attention(q, k, v, chunk_size=chunk_size, segment_ids=segment_ids)
  return chunked_attention_xla(q, k, v, chunk_size=chunk_size, segment_ids=segment_ids,
                               dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def cached_attention(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, start: jax.Array | int, *,
                     impl: str = "auto") -> jax.Array:
  """Decoding/prefill attention to the current chunk; shapes as `cached_attention_xla`.

  'auto' sends fewer than PALLAS_MIN_CACHED_QUERIES queries (decoding) to XLA when there is one
  sequence or one head: the kernel's grid has one query block, so a single query keeps a handful
  of programs busy (52 us per mega1.3B layer on an H200, where XLA's products take a few). With
  several sequences and several heads XLA's batched products want (batch, head) leading and
  transpose the whole [B, C, H, d] buffers every step (16 ms per mega1.3B step at batch 16 when
  Python dispatches each step, against 5.4 ms with the kernel), so those stay on the kernel."""
  batch, steps, heads = q.shape[:3]
  xla_is_faster = steps < PALLAS_MIN_CACHED_QUERIES and (batch == 1 or heads == 1)
  if impl == "pallas" or (impl == "auto" and _pallas_available() and not xla_is_faster
                          and _kernel_takes(q.shape[-1], v_buf.shape[-1])):
    from kernels_pallas import chunk_attention as kernel
    return kernel.cached_chunk_attention(q, k_buf, v_buf, start)
  return cached_attention_xla(q, k_buf, v_buf, start)
