"""Chunked attention and RoPE against float64 numpy references."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from megalodon_jax.config import ConfigError
from megalodon_jax.ops import attention, rope


def dense_reference(q, k, v, chunk, segment_ids=None):
  """float64 dense softmax attention with a block-diagonal causal mask built position by position."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, l, h, _ = q.shape
  out = np.zeros(v.shape)
  for bi in range(b):
    for hi in range(h):
      scores = q[bi, :, hi] @ k[bi, :, hi].T
      for i in range(l):
        for j in range(l):
          visible = j <= i and i // chunk == j // chunk
          if segment_ids is not None:
            visible = visible and segment_ids[bi, i] == segment_ids[bi, j]
          if not visible:
            scores[i, j] = -np.inf
      p = np.exp(scores - scores.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi]
  return out


@pytest.mark.parametrize("length,chunk", [(12, 16), (16, 16), (48, 16)])
def test_chunked_attention_matches_dense(rng, length, chunk):
  q, k = (rng.normal(size=(2, length, 2, 8)).astype(np.float32) for _ in range(2))
  v = rng.normal(size=(2, length, 2, 12)).astype(np.float32)
  out = attention.chunked_attention_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=chunk)
  np.testing.assert_allclose(out, dense_reference(q, k, v, min(chunk, length)), rtol=1e-5, atol=1e-5)


def test_chunked_attention_segments(rng):
  q, k = (rng.normal(size=(1, 32, 1, 4)).astype(np.float32) for _ in range(2))
  v = rng.normal(size=(1, 32, 1, 4)).astype(np.float32)
  seg = np.repeat(np.array([[1, 2, 2, 3, 0, 0, 4, 4]]), 4, axis=1)
  out = attention.chunked_attention_xla(*map(jnp.asarray, (q, k, v)), chunk_size=16, segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(out, dense_reference(q, k, v, 16, seg), rtol=1e-5, atol=1e-5)


def test_cached_attention_matches_dense_prefix(rng):
  chunk, start, steps = 16, 5, 3
  q, k = (rng.normal(size=(1, chunk, 2, 4)).astype(np.float32) for _ in range(2))
  v = rng.normal(size=(1, chunk, 2, 6)).astype(np.float32)
  ref = dense_reference(q, k, v, chunk)[:, start:start + steps]
  stale_k = k.copy()
  stale_k[:, start + steps:] = 100.0  # entries past the new steps must be masked out
  out = attention.cached_attention_xla(jnp.asarray(q[:, start:start + steps]), jnp.asarray(stale_k),
                                       jnp.asarray(v), start)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_length_not_multiple_of_chunk_is_a_clear_error():
  x = jnp.zeros((1, 24, 1, 4))
  with pytest.raises(ConfigError, match="not a multiple"):
    attention.chunked_attention_xla(x, x, x, chunk_size=16)


def test_rope_matches_complex_rotation(rng):
  x = rng.normal(size=(2, 10, 3, 8)).astype(np.float32)
  positions = rope.chunk_positions(10, 4)
  out = np.asarray(rope.apply_rope(jnp.asarray(x), positions, base=100.0))
  pos = np.arange(10) % 4
  freqs = 100.0 ** (-np.arange(0, 8, 2) / 8)
  z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
  rot = z * np.exp(1j * pos[None, :, None, None] * freqs)
  np.testing.assert_allclose(out[..., 0::2], rot.real, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[..., 1::2], rot.imag, rtol=1e-5, atol=1e-5)


def test_positions_restart_at_chunks_and_documents():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 0, 0]])
  got = np.asarray(rope.chunk_positions(12, 4, seg))[0]
  expected = []
  for t in range(12):
    doc_start = max(s for s in range(t + 1) if s == 0 or seg[0, s] != seg[0, s - 1])
    expected.append(t - max(doc_start, t - t % 4))
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(np.asarray(rope.chunk_positions(3, 8, offset=2))[0], [2, 3, 4])


@pytest.mark.parametrize("batch, steps, heads, expect", [
    (1, 1, 2, "xla"), (1, attention.PALLAS_MIN_CACHED_QUERIES, 2, "pallas"), (3, 1, 2, "pallas"), (3, 1, 1, "xla")])
def test_auto_cached_attention_sends_single_queries_to_xla(rng, monkeypatch, batch, steps, heads, expect):
  import kernels_pallas.chunk_attention as kernel
  used = []
  monkeypatch.setattr(attention, "_pallas_available", lambda: True)
  monkeypatch.setattr(kernel, "cached_chunk_attention", lambda *a: used.append("pallas") or attention.cached_attention_xla(*a))
  # Head dims of 16: on a GPU, 'auto' sends smaller heads to XLA whatever the query count.
  q = jnp.asarray(rng.standard_normal((batch, steps, heads, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, 32, heads, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, 32, heads, 16)), jnp.float32)
  out = attention.cached_attention(q, k, v, 3)
  np.testing.assert_allclose(out, attention.cached_attention_xla(q, k, v, 3), rtol=1e-6)
  assert (used[:1] or ["xla"])[0] == expect


@pytest.mark.parametrize("dk, dv, expect", [(8, 32, "xla"), (32, 8, "xla"), (16, 16, "pallas")])
def test_auto_on_a_gpu_sends_small_heads_to_xla(rng, monkeypatch, dk, dv, expect):
  """The compiled GPU kernels contract dk and dv in tensor-core products that need >= 16 features;
  'auto' sends smaller heads to XLA, and the kernel itself refuses them when compiled."""
  import kernels_pallas.chunk_attention as kernel
  used = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_pallas_available", lambda: True)
  monkeypatch.setattr(kernel, "chunk_attention",
                      lambda q, k, v, chunk_size, segment_ids: used.append("pallas")
                      or attention.chunked_attention_xla(q, k, v, chunk_size=chunk_size, segment_ids=segment_ids))
  monkeypatch.setattr(kernel, "cached_chunk_attention",
                      lambda *a: used.append("pallas") or attention.cached_attention_xla(*a))
  q = jnp.asarray(rng.standard_normal((2, 16, 2, dk)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 16, 2, dk)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 16, 2, dv)), jnp.float32)
  out = attention.chunked_attention(q, k, v, chunk_size=8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(attention.chunked_attention_xla(q, k, v, chunk_size=8)),
                             rtol=1e-6, atol=1e-6)
  attention.cached_attention(q, k, v, 0)
  assert used == ([] if expect == "xla" else ["pallas", "pallas"])


def test_gpu_kernel_refuses_small_heads_when_compiled(rng):
  import kernels_pallas.chunk_attention as kernel
  q = jnp.asarray(rng.standard_normal((1, 16, 1, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 16, 1, 32)), jnp.float32)
  with pytest.raises(ValueError, match="head dims >= 16 \\(got 8 and 32\\)"):
    kernel.chunk_attention(q, q, v, chunk_size=8, platform="triton", interpret=False)
  with pytest.raises(ValueError, match="head dims >= 16"):
    kernel.cached_chunk_attention(q[:, :1], q, v, 0, platform="triton", interpret=False)
