"""kernels_pallas.cema_summary: the slice-summary kernels (interpreted on the CPU) against float64
and their plain-JAX reference (values and gradients), their CUDA lowering, and their use in
ops.cema.cema_slice_summary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import cema_summary as K
from megalodon_jax.ops import cema as cema_ops


def _problem(batch, chunks, block, dim, order, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, chunks * block, dim)), dtype)
  mags = rng.uniform(0.3, 0.999, (dim, order))
  mags[0, 0] = 1.0 - 1e-6  # barely decays: the chunk's sum is ~block terms of one size
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, order))), jnp.complex64)
  cot = jnp.asarray(rng.normal(size=(batch, chunks, dim, order)) + 1j * rng.normal(size=(batch, chunks, dim, order)),
                    jnp.complex64)
  return x, q, cot


def _rel(a, b):
  """max |a - b| over max |b|; the absolute difference where b is all zero (e.g. gamma's
  gradient: the summary does not use it)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = np.max(np.abs(b))
  return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


@pytest.mark.parametrize("layout", K.LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_slice_summary_planes_against_its_reference(layout, dtype):
  """The kernel (interpreted) against slice_summary_reference: values and gradients in x and q."""
  batch, chunks, block, dim, order, length = 2, 3, 8, 16, 4, 21
  x, q, _ = _problem(batch, chunks, block, dim, order, seed=7, dtype=dtype)
  x = x.at[:, : chunks * block - length].set(0.0)
  rng = np.random.default_rng(8)
  w = jnp.asarray(rng.normal(size=(4, batch, order, dim)), jnp.float32)

  def loss(fn):
    def f(x, q):
      h_re, h_im, decay = fn(x, q)
      return (jnp.sum(h_re * w[0]) + jnp.sum(h_im * w[1]) + jnp.sum(jnp.real(decay).T * w[2, 0])
              + jnp.sum(jnp.imag(decay).T * w[3, 0]))
    return f

  def kernel(x, q):
    with K.use_layout(layout):
      return K.slice_summary_planes(x, q, block, length, interpret=True)

  reference = functools.partial(K.slice_summary_reference, length=length)
  for got, want in zip(kernel(x, q), reference(x, q)):
    assert _rel(got, want) < 2e-6
  grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(x, q)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(x, q)
  assert grads[0].dtype == x.dtype and grads[1].dtype == jnp.complex64
  as32 = lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a  # noqa: E731
  for g, w_ in zip(grads, want):
    assert _rel(as32(g), as32(w_)) < (1e-2 if dtype == jnp.bfloat16 else 2e-6)


def test_slice_summary_planes_scale():
  """scale=s gives s h exactly (the planes times s^T) and the gradients in x, q and s of s h with
  s applied outside; the VJP keeps q, s, the tables and one packed array, nothing more."""
  batch, chunks, block, dim, order, length = 2, 3, 8, 16, 4, 21
  x, q, _ = _problem(batch, chunks, block, dim, order, seed=9)
  x = x.at[:, : chunks * block - length].set(0.0)
  rng = np.random.default_rng(10)
  s = jnp.asarray(rng.uniform(0.1, 1.0, (dim, order)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, batch, order, dim)), jnp.float32)

  def loss(fn):
    def f(x, q, s):
      h_re, h_im, decay = fn(x, q, s)
      return (jnp.sum(h_re * w[0]) + jnp.sum(h_im * w[1]) + jnp.sum(jnp.real(decay).T * w[2, 0])
              + jnp.sum(jnp.imag(decay).T * w[3, 0]))
    return f

  inside = lambda x, q, s: K.slice_summary_planes(x, q, block, length, interpret=True, scale=s)  # noqa: E731

  def outside(x, q, s):
    h_re, h_im, decay = K.slice_summary_planes(x, q, block, length, interpret=True)
    return s.T * h_re, s.T * h_im, decay

  for got, want in zip(inside(x, q, s), outside(x, q, s)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  grads = jax.jit(jax.grad(loss(inside), argnums=(0, 1, 2)))(x, q, s)
  want = jax.jit(jax.grad(loss(outside), argnums=(0, 1, 2)))(x, q, s)
  for g, w_ in zip(grads, want):
    assert g.dtype == w_.dtype and _rel(g, w_) < 2e-6
  _, vjp = jax.vjp(inside, x, q, s)
  residuals = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape") and leaf.size]
  assert len(residuals) <= 4, [r.shape for r in residuals]  # q, s, packed, tables
  with pytest.raises(ValueError, match="scale must be real"):
    K.slice_summary_planes(x, q, block, length, interpret=True, scale=s.astype(jnp.complex64))


def test_clear_errors():
  with pytest.raises(ValueError, match="unknown chunk-summary layout"):
    with K.use_layout("rows"):
      pass
  with pytest.raises(ValueError, match="power-of-2 N"):
    K.slice_summary_planes(jnp.zeros((1, 8, 4)), jnp.ones((4, 3), jnp.complex64), 4, 8, interpret=True)
  with pytest.raises(ValueError, match="needs x"):
    K.slice_summary_planes(jnp.zeros((1, 9, 4)), jnp.ones((4, 2), jnp.complex64), 4, 9, interpret=True)
  with pytest.raises(ValueError, match="needs x"):  # more zeros in front than one chunk
    K.slice_summary_planes(jnp.zeros((1, 8, 4)), jnp.ones((4, 2), jnp.complex64), 4, 3, interpret=True)


def test_slice_summary_kernel_path_equals_the_xla_path():
  """ops.cema.cema_slice_summary with powers="pallas" (tables and chunk sums as kernels) against
  powers="xla" (XLA's tables and the einsum form), values and gradients, with segment resets and a
  length that is not a multiple of the chunk (the kernel path pads in front)."""
  rng = np.random.default_rng(3)
  batch, length, dim, order = 2, 50, 8, 4
  alpha, delta = (jnp.asarray(rng.normal(0.0, 0.5, (dim, order, 1)), jnp.float32) for _ in range(2))
  theta = jnp.asarray(rng.normal(0.0, 1.0, (dim, 1, 1)), jnp.float32)
  gamma = jnp.asarray(rng.normal(0.0, 1.0, (dim, order, 2)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  seg = jnp.asarray(np.repeat(np.array([[0] * 20 + [1] * 30, [4] * 50]), 1, axis=0), jnp.int32)
  w = jnp.asarray(rng.normal(size=(batch, dim, order)), jnp.float32)

  def loss(powers):
    def fn(x, alpha, delta, theta, gamma):
      coeffs = cema_ops.cema_coefficients(alpha, delta, theta, gamma)
      h, decay = cema_ops.cema_slice_summary(x, coeffs, seg, powers=powers)
      return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h)) + jnp.sum(jnp.real(decay)), h
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4), has_aux=True))

  (value_k, h_k), grads_k = loss("pallas")(x, alpha, delta, theta, gamma)
  (value_x, h_x), grads_x = loss("xla")(x, alpha, delta, theta, gamma)
  text = str(jax.make_jaxpr(lambda x: cema_ops.cema_slice_summary(
      x, cema_ops.cema_coefficients(alpha, delta, theta, gamma), seg, powers="pallas"))(x))
  assert "cema_slice_summary" in text  # the kernel path ran, not the fallback
  assert _rel(h_k, h_x) < 2e-6 and abs(float(value_k - value_x)) < 1e-5 * abs(float(value_x))
  for g_k, g_x in zip(grads_k, grads_x):
    assert _rel(g_k, g_x) < 1e-5
  # The first run of row 0 does not reach the state: changing it changes nothing.
  (_, h_changed), _ = loss("pallas")(x.at[0, :20].set(5.0), alpha, delta, theta, gamma)
  np.testing.assert_array_equal(np.asarray(h_changed[0]), np.asarray(h_k[0]))


@pytest.mark.parametrize("layout", K.LAYOUTS)
@pytest.mark.parametrize("batch,chunks,block,dim,order,length", [(2, 3, 8, 16, 4, 20), (1, 4, 16, 8, 2, 64),
                                                                 (1, 1, 4, 8, 4, 3)])
def test_slice_summary_planes_against_float64(layout, batch, chunks, block, dim, order, length):
  """slice_summary_planes (interpreted): h = sum_t q^(J T - 1 - t) x_t and q^length against float64,
  and the gradient of a real functional of both in x and in q against float64's closed forms
  (dh/dq = sum_t (J T - 1 - t) q^(J T - 2 - t) x_t; JAX's q-cotangent of a holomorphic map is
  sum cot * derivative, no conjugate)."""
  x, q, _ = _problem(batch, chunks, block, dim, order, seed=5)
  x = x.at[:, : chunks * block - length].set(0.0)  # the zeros in front of a slice of `length` steps
  rng = np.random.default_rng(6)
  w_h = rng.normal(size=(batch, order, dim)) + 1j * rng.normal(size=(batch, order, dim))
  w_d = rng.normal(size=(dim, order)) + 1j * rng.normal(size=(dim, order))

  def loss(x, q):
    with K.use_layout(layout):
      h_re, h_im, decay = K.slice_summary_planes(x, q, block, length, interpret=True)
    h = jax.lax.complex(h_re, h_im)
    return jnp.sum(jnp.real(h * jnp.asarray(w_h, jnp.complex64))) + jnp.sum(jnp.real(decay * jnp.asarray(w_d, jnp.complex64)))

  with K.use_layout(layout):
    h_re, h_im, decay = K.slice_summary_planes(x, q, block, length, interpret=True)
  total = chunks * block
  q64, x64 = np.asarray(q, np.complex128), np.asarray(x, np.float64)
  lags = total - 1 - np.arange(total)
  h64 = np.einsum("dnt,btd->bnd", q64[..., None] ** lags, x64)
  assert _rel(jax.lax.complex(h_re, h_im), h64) < 2e-6
  assert _rel(decay, q64 ** length) < 2e-6
  dx, dq = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, q)
  dx64 = np.einsum("dnt,bnd->btd", q64[..., None] ** lags, w_h).real
  deriv = lags * q64[..., None] ** np.maximum(lags - 1, 0)  # [D, N, T]
  dq64 = np.einsum("dnt,btd,bnd->dn", deriv, x64, w_h) + w_d * length * q64 ** (length - 1)
  assert _rel(dx, dx64) < 2e-6
  assert _rel(dq, dq64) < 2e-6


@pytest.mark.parametrize("layout", K.LAYOUTS)
def test_slice_summary_cuda_lowering(layout):
  x = jnp.zeros((1, 4 * 128, 1024), jnp.bfloat16)
  q = jnp.full((1024, 16), 0.999 + 0.01j, jnp.complex64)

  def fn(x, q):
    h_re, h_im, decay = K.slice_summary_planes(x, q, 128, 4 * 128 - 5)
    return jnp.sum(h_re) + jnp.sum(h_im) + jnp.sum(jnp.abs(decay))

  with K.use_layout(layout):
    text = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
    primal = jax.jit(fn).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
  assert "cema_slice_summary" in text and "cema_slice_summary_bwd" in text and "cema_power_tables" in text
  assert "cema_slice_summary_bwd" not in primal and "fma.rn.f32" in text
