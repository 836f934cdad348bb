"""ops/dense.py: the projection dot_general equals lax.dot_general, single rows included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from megalodon_jax.ops import dense

CONTRACT_LAST = (((2,), (0,)), ((), ()))


@pytest.mark.parametrize("shape, dims, doubled", [
    ((1, 1, 12), CONTRACT_LAST, 0),          # batch-1 decoding: one row
    ((3, 1, 12), CONTRACT_LAST, None),       # several rows: untouched
    ((1, 12), (((1,), (0,)), ((), ())), 0),
    ((12, 1), (((0,), (0,)), ((), ())), 1),  # the single row's axis need not come first
])
def test_dot_general_equals_lax_dot_general(shape, dims, doubled):
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
  assert dense.single_row_axis(lhs.shape, dims) == doubled
  want = np.einsum("...k,kn->...n", np.moveaxis(np.asarray(lhs, np.float64), dims[0][0][0], -1), np.asarray(rhs, np.float64))
  got = dense.dot_general(lhs, rhs, dims, precision=lax.Precision.HIGHEST)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Differentiable like lax.dot_general (a decode step is not, but a batch of one token may be).
  g = jax.grad(lambda a, b: jnp.sum(jnp.sin(dense.dot_general(a, b, dims))), argnums=(0, 1))(lhs, rhs)
  g_ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(lax.dot_general(a, b, dims))), argnums=(0, 1))(lhs, rhs)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_single_row_is_fed_twice_behind_a_barrier():
  lhs = jnp.ones((1, 1, 12))
  jaxpr = str(jax.make_jaxpr(lambda a, b: dense.dot_general(a, b, CONTRACT_LAST))(lhs, jnp.ones((12, 5))))
  assert "optimization_barrier" in jaxpr and "2,1,12" in jaxpr.replace(" ", "")
