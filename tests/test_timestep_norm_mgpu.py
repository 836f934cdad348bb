"""kernels_pallas/timestep_norm_mgpu.py (TimestepNorm forward, Mosaic GPU) on the CPU.

  * the kernel under Mosaic GPU's CPU interpreter (tests/mgpu_interpreter.py: warpgroups as threads,
    barriers, TMA and wgmma simulated, races detected) against a float64 numpy Welford recurrence
    (the SPEC's step-by-step definition), with and without a prior state, in bf16 and float16, with a
    large mean (the in-tile shift must keep the variance accurate), one to three compute warpgroups;
  * its pieces: the exact bf16 split, the prefix operand;
  * it lowers for CUDA at the benchmark shape into one Mosaic GPU custom call (run this file with
    -k lowers under the GPU machine's jax as well);
  * unsupported inputs raise ValueError and `supported` says False.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import timestep_norm_mgpu as tm


def welford_float64(x, w_hat, bias, n0, mu0, var0, num_groups: int, eps: float):
  """The SPEC's recurrence step by step in float64: (y, mu_run [B, G, L], rstd_run, mean, var)."""
  x = np.asarray(x, np.float64)
  batch, length, dim = x.shape
  xg = x.reshape(batch, length, num_groups, dim // num_groups)
  m_t = xg.mean(-1)
  v_t = ((xg - m_t[..., None]) ** 2).mean(-1)
  n = np.asarray(n0, np.float64)[:, None].repeat(num_groups, 1)
  mu = np.asarray(mu0, np.float64).copy()
  var = np.asarray(var0, np.float64).copy()
  mus, variances = np.empty((batch, num_groups, length)), np.empty((batch, num_groups, length))
  for t in range(length):
    n1 = n + 1
    delta = m_t[:, t] - mu
    mu = mu + delta / n1
    var = (n * var + v_t[:, t]) / n1 + delta ** 2 * n / n1 ** 2
    n = n1
    mus[:, :, t], variances[:, :, t] = mu, var
  rstd = 1.0 / np.sqrt(variances + eps)
  mu_l, rstd_l = np.moveaxis(mus, 2, 1), np.moveaxis(rstd, 2, 1)  # [B, L, G]
  y = (xg - mu_l[..., None]) * rstd_l[..., None]
  y = y.reshape(batch, length, dim) * np.asarray(w_hat, np.float64) + np.asarray(bias, np.float64)
  return y, mus, rstd, mu, var


@pytest.fixture
def _interpreter(monkeypatch):
  """Mosaic GPU's CPU interpreter, completed for our kernels (tests/mgpu_interpreter.py)."""
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


def _inputs(rng, batch, length, dim, groups, dtype, *, mean=0.0, prior=True):
  x = mean + rng.standard_normal((batch, length, dim)) * (1.0 + rng.random((1, 1, dim)))
  w_hat = 1.0 + 0.1 * rng.standard_normal(dim)
  bias = 0.1 * rng.standard_normal(dim)
  if prior:
    n0 = rng.integers(1, 50, batch).astype(np.float32)
    mu0 = mean + rng.standard_normal((batch, groups))
    var0 = 0.5 + rng.random((batch, groups))
  else:
    n0 = np.zeros(batch, np.float32)
    mu0 = rng.standard_normal((batch, groups)) * 1e3  # ignored: no weight
    var0 = rng.random((batch, groups)) * 1e3
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return jnp.asarray(x, dtype), f32(w_hat), f32(bias), f32(n0), f32(mu0), f32(var0)


@pytest.mark.parametrize("batch,length,dim,groups,block_t,stages,wgs,layout,dtype,mean,prior", [
    (2, 512, 128, 2, 128, 2, 2, "wide", jnp.bfloat16, 0.0, True),
    (1, 768, 64, 1, 128, 2, 3, "wide", jnp.bfloat16, 0.0, True),
])
def test_kernel_matches_welford_in_the_interpreter(rng, _interpreter, batch, length, dim, groups, block_t,
                                                   stages, wgs, layout, dtype, mean, prior):
  params, gpu_callbacks = _interpreter
  eps = 1e-5
  args = _inputs(rng, batch, length, dim, groups, dtype, mean=mean, prior=prior)
  y, mu_run, rstd_run, mean_f, var_f = tm.timestep_norm_fwd_mgpu(
      *args, num_groups=groups, eps=eps, block_t=block_t, stages=stages, compute_wgs=wgs,
      tile_layout=layout, interpret=params)
  assert not gpu_callbacks.get_races().races_found
  want_y, want_mu, want_rstd, want_mean, want_var = welford_float64(*args, groups, eps)
  np.testing.assert_allclose(np.asarray(mu_run), want_mu, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rstd_run), want_rstd, rtol=1e-5, atol=0)
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=0, atol=3e-2)
  np.testing.assert_allclose(np.asarray(mean_f), want_mean, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(var_f), want_var, rtol=1e-5, atol=0)
