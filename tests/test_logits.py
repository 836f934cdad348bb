"""The output head's custom VJP against float64 numpy, and its dtype handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops.logits import output_logits


def _inputs(dtype_x, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 5, 12)).astype(np.float32)
  w = rng.standard_normal((12, 7)).astype(np.float32) / np.sqrt(12)
  g = rng.standard_normal((2, 5, 7)).astype(np.float32)
  return jnp.asarray(x, dtype_x), jnp.asarray(w), g


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_float32_compute_matches_float64(x_dtype):
  x, w, g = _inputs(x_dtype)
  logits, vjp = jax.vjp(lambda a, b: output_logits(a, b, jnp.float32), x, w)
  dx, dw = vjp(jnp.asarray(g))
  x64, w64, g64 = np.asarray(x, np.float64), np.asarray(w, np.float64), g.astype(np.float64)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, x64 @ w64, rtol=1e-5, atol=1e-5)
  assert dx.dtype == x_dtype and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w64.T, rtol=1e-2 if x_dtype == jnp.bfloat16 else 1e-5,
                             atol=1e-2 if x_dtype == jnp.bfloat16 else 1e-5)
  np.testing.assert_allclose(dw, np.einsum("bld,blv->dv", x64, g64), rtol=1e-5, atol=1e-5)


def test_bf16_compute_rounds_the_logit_gradient_to_bf16():
  """Backward GEMMs see the bf16-rounded gradient: equal to float64 products of rounded inputs."""
  x, w, g = _inputs(jnp.float32, seed=1)
  logits, vjp = jax.vjp(lambda a, b: output_logits(a, b, jnp.bfloat16), x, w)
  dx, dw = vjp(jnp.asarray(g))
  r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)  # noqa: E731
  xr, wr, gr = r(x), r(w), r(g)
  assert logits.dtype == jnp.float32 and dx.dtype == jnp.float32 and dw.dtype == jnp.float32
  np.testing.assert_allclose(logits, xr @ wr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("bld,blv->dv", xr, gr), rtol=1e-5, atol=1e-5)
  # And it differs from the float32 gradient by bf16 rounding, not more.
  np.testing.assert_allclose(dx, g.astype(np.float64) @ np.asarray(w, np.float64).T, rtol=0.05, atol=0.05)


def test_backward_gemms_are_low_precision():
  """The jaxpr of the gradient has no float32 x float32 dot (the automatic transpose had two)."""
  x, w, g = _inputs(jnp.bfloat16)

  def loss(a, b):
    return jnp.sum(output_logits(a, b, jnp.bfloat16) * jnp.asarray(g))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for e in dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
