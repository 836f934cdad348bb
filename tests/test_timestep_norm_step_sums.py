"""kernels_pallas/timestep_norm_step_sums.py: the per-tile sums over half of every sequence, run by the Pallas
interpreter on the CPU, against float64 numpy and against their plain-JAX references; and their Triton lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import timestep_norm_step_sums as ss


def _inputs(batch=2, length=512, dim=256, groups=4):
  keys = jax.random.split(jax.random.PRNGKey(5), 6)
  x = (3.0 + jax.random.normal(keys[0], (batch, length, dim))).astype(jnp.bfloat16)
  dy = jax.random.normal(keys[1], (batch, length, dim)).astype(jnp.bfloat16)
  w_hat = 1.0 + 0.1 * jax.random.normal(keys[2], (dim,))
  half = length // 2
  mu_run = 3.0 + 0.1 * jax.random.normal(keys[3], (2 * batch, groups, half))
  rstd_run = 1.0 + 0.2 * jax.random.uniform(keys[4], (2 * batch, groups, half))
  mu_mid = 3.0 + 0.1 * jax.random.normal(keys[5], (batch, groups))
  n_mid = jnp.asarray([300.0, 7.0])[:batch]
  return x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid


def _tiles64(a, start, stop, block_t, groups):
  """[B, L, D] -> float64 [B, tiles, T, G, K] of the steps start .. stop - 1."""
  a = np.asarray(a, np.float64)[:, start:stop]
  return a.reshape(a.shape[0], -1, block_t, groups, a.shape[-1] // groups)


@pytest.mark.parametrize("groups,tiling", [(4, ss.DEFAULT), (16, ss.Tiling(block_t=128, block_groups=8)),
                                           (2, ss.Tiling(block_t=32, block_groups=4))])
def test_tile_moments_match_float64(groups, tiling):
  x = _inputs()[0]
  mean, var = ss.tile_moments(x, num_groups=groups, tiling=tiling, interpret=True)
  xt = _tiles64(x, 0, x.shape[1] // 2, tiling.block_t, groups)
  m, v = xt.mean(-1), xt.var(-1)                   # [B, tiles, T, G] per step
  want_mean = m.mean(2)
  want_var = (v + (m - want_mean[:, :, None]) ** 2).mean(2)
  np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(var), want_var, rtol=1e-5)
  ref = ss.tile_moments_reference(x, num_groups=groups, block_t=tiling.block_t)
  for got, r in zip((mean, var), ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=1e-5)


@pytest.mark.parametrize("tiling", [ss.DEFAULT, ss.Tiling(block_t=128, block_groups=2), ss.Tiling(block_t=32)])
def test_tile_adjoint_sums_match_float64(tiling):
  groups = 4
  x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid = _inputs(groups=groups)
  a, b = ss.tile_adjoint_sums(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=groups, tiling=tiling,
                              interpret=True)
  half, t = x.shape[1] // 2, tiling.block_t
  xt = _tiles64(x, half, 2 * half, t, groups)
  dyw = _tiles64(np.asarray(dy, np.float64) * np.asarray(w_hat, np.float64), half, 2 * half, t, groups)
  second = lambda s: np.moveaxis(np.asarray(s, np.float64)[1::2], 1, 2).reshape(x.shape[0], -1, t, groups)  # noqa: E731
  mu, rstd = second(mu_run), second(rstd_run)      # [B, tiles, T, G]
  l_mu = -rstd * dyw.sum(-1)
  l_var = -0.5 * rstd ** 3 * (dyw * (xt - mu[..., None])).sum(-1)
  n = np.asarray(n_mid, np.float64)[:, None, None, None] + np.arange(1, half + 1).reshape(1, -1, t, 1)
  want_a = (l_var / n).sum(2)
  want_b = ((l_mu - 2 * (mu - np.asarray(mu_mid, np.float64)[:, None, None]) * l_var) / n).sum(2)
  for got, want in ((a, want_a), (b, want_b)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
  ref = ss.tile_adjoint_sums_reference(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=groups,
                                       block_t=t)
  for got, r in zip((a, b), ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=1e-4, atol=1e-5 * np.max(np.abs(r)))


def test_bad_shapes_are_explained():
  x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid = _inputs()
  with pytest.raises(ValueError, match="whole tiles in each half"):
    ss.tile_moments(x[:, :448], num_groups=4, interpret=True)
  with pytest.raises(ValueError, match="power of 2"):
    ss.tile_moments(x[..., :192], num_groups=2, interpret=True)
  with pytest.raises(ValueError, match="dy must have x's shape"):
    ss.tile_adjoint_sums(x, dy[:, :256], w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=4, interpret=True)
  with pytest.raises(ValueError, match=r"mu_run must be \[2B, G, L / 2\]"):
    ss.tile_adjoint_sums(x, dy, w_hat, mu_run[:2], rstd_run, n_mid, mu_mid, num_groups=4, interpret=True)


def test_lowers_to_triton_for_cuda():
  """Both kernels lower to Triton for a CUDA target (no GPU needed): catches primitives or block shapes the Pallas
  Triton backend does not take (the transposed loads of the saved statistics among them)."""
  from jax import export

  def both(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid):
    return (ss.tile_moments(x, num_groups=64),
            ss.tile_adjoint_sums(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=64))
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  seq = jax.ShapeDtypeStruct((1, 2048, 4096), jnp.bfloat16)
  exported = export.export(
      jax.jit(both), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          seq, seq, f32(4096), f32(2, 64, 1024), f32(2, 64, 1024), f32(1), f32(1, 64))
  text = exported.mlir_module()
  for name in ("timestep_norm_half_moments", "timestep_norm_half_adjoint"):
    assert f'name = "{name}"' in text, name


@pytest.mark.gpu
def test_kernels_match_their_references_on_the_gpu():
  """Compiled by Triton on the GPU (run with MEGALODON_TEST_PLATFORM=gpu -m gpu): both kernels at the default and
  the single pass's tilings against their plain-JAX references (float32 XLA on the same GPU)."""
  if jax.default_backend() != "gpu":
    pytest.fail("needs a GPU (run with MEGALODON_TEST_PLATFORM=gpu)")
  groups = 4
  x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid = _inputs(groups=groups)
  for tiling in (ss.DEFAULT, ss.Tiling(block_t=32, block_groups=2, num_warps=2)):
    mean, var = ss.tile_moments(x, num_groups=groups, tiling=tiling)
    ref_mean, ref_var = ss.tile_moments_reference(x, num_groups=groups, block_t=tiling.block_t)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(ref_mean), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var), np.asarray(ref_var), rtol=1e-4)
    a, b = ss.tile_adjoint_sums(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=groups, tiling=tiling)
    ref = ss.tile_adjoint_sums_reference(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=groups,
                                         block_t=tiling.block_t)
    for got, r in zip((a, b), ref):
      np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))))
