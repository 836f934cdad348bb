"""kernels_pallas/timestep_norm_mgpu.py (TimestepNorm forward, Mosaic GPU) on the CPU.

  * the kernel under Mosaic GPU's CPU interpreter (tests/mgpu_interpreter.py: warpgroups as threads,
    barriers, TMA and wgmma simulated, races detected) against the SPEC's step-by-step recurrence in
    float64 (itself checked against ops.timestep_norm's sequential scan): with and without a prior
    state, bf16 and float16, a large mean (the in-tile shift must keep the variance accurate), one to
    three compute warpgroups, tiles of 64 and 128 steps, K = 64 and 128, both register layouts and
    both ways of storing y; outlier steps where the shifts are weakest;
  * its pieces: the exact bf16 split, the reciprocal;
  * it lowers for CUDA at the benchmark shape into one Mosaic GPU custom call, asking for no more
    shared memory than `smem_bytes` counts (run `-k lowers` under the GPU machine's jax as well);
  * unsupported inputs raise ValueError and `supported` says False.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import timestep_norm_mgpu as tm
from tests.mgpu_lowering import capture_smem_requests

_EPS = 1e-5


def welford_float64(x, w_hat, bias, n0, mu0, var0, num_groups: int, eps: float):
  """The SPEC's recurrence step by step in float64 -> (y, mu_run [B, G, L], rstd_run, mean, var)."""
  x = np.asarray(x, np.float64)
  batch, length, dim = x.shape
  xg = x.reshape(batch, length, num_groups, dim // num_groups)
  m_t = xg.mean(-1)
  v_t = ((xg - m_t[..., None]) ** 2).mean(-1)
  n = np.repeat(np.asarray(n0, np.float64)[:, None], num_groups, 1)
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


def _inputs(rng, batch, length, dim, groups, dtype, *, mean=0.0, prior=True):
  """x with per-feature scales and a slow drift; a prior state (n0 > 0) or none (n0 = 0, with a
  stale mean / var that must carry no weight)."""
  drift = np.linspace(0.0, 2.0, length)[None, :, None]
  x = mean + drift + rng.standard_normal((batch, length, dim)) * (0.5 + rng.random((1, 1, dim)))
  w_hat = 1.0 + 0.1 * rng.standard_normal(dim)
  bias = 0.1 * rng.standard_normal(dim)
  if prior:
    n0 = rng.integers(1, 50, batch)
    mu0 = mean + rng.standard_normal((batch, groups))
    var0 = 0.5 + rng.random((batch, groups))
  else:
    n0 = np.zeros(batch)
    mu0 = 1e3 * rng.standard_normal((batch, groups))
    var0 = 1e3 * rng.random((batch, groups))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return jnp.asarray(x, dtype), f32(w_hat), f32(bias), f32(n0), f32(mu0), f32(var0)


def test_float64_reference_is_the_sequential_op(rng):
  """The float64 recurrence agrees with ops.timestep_norm (method='sequential', float32)."""
  from megalodon_jax.ops import timestep_norm as tsn
  batch, length, dim, groups = 2, 96, 32, 4
  x, w_hat, bias, n0, mu0, var0 = _inputs(rng, batch, length, dim, groups, jnp.float32)
  state = tsn.TimestepNormState(n0.astype(jnp.int32), mu0, var0)
  y, final = tsn.timestep_norm(x, w_hat - 1.0, bias, num_groups=groups, eps=_EPS, state=state,
                               method="sequential")
  want_y, _, _, want_mean, want_var = welford_float64(x, w_hat, bias, n0, mu0, var0, groups, _EPS)
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(final.mean), want_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(final.var), want_var, rtol=1e-5)


@pytest.fixture
def _interpreter(monkeypatch):
  """Mosaic GPU's CPU interpreter, completed for our kernels (tests/mgpu_interpreter.py)."""
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


@pytest.mark.parametrize("shape,dtype,mean,prior,config", [
    # Two warpgroups taking tiles in turn, two tiles each per program; four programs.
    ((2, 512, 128, 2), jnp.bfloat16, 0.0, True, dict(block_t=128, stages=2, compute_wgs=2)),
    # No prior state, large mean (float16 keeps x's noise at a mean of 100), the wide layout.
    ((1, 512, 128, 2), jnp.float16, 100.0, False, dict(block_t=128, stages=3, tile_layout="wide")),
    # One warpgroup (the carry stays within it), 64-step tiles, ring longer than a round.
    ((1, 512, 256, 4), jnp.float16, 100.0, True, dict(block_t=64, stages=3, compute_wgs=1)),
    # Three warpgroups, 5 tiles: uneven shares; y stored from registers.
    ((1, 640, 64, 1), jnp.bfloat16, 0.0, False, dict(block_t=128, stages=2, compute_wgs=3,
                                                     tile_layout="wide", y_store="direct")),
    # K = 128 features per group (two 128-byte column blocks per tile row), Pallas' own barriers.
    ((1, 256, 256, 2), jnp.bfloat16, 0.0, True, dict(block_t=64, stages=2, auto_barriers=True)),
])
def test_kernel_matches_welford_in_the_interpreter(rng, _interpreter, shape, dtype, mean, prior, config):
  params, gpu_callbacks = _interpreter
  batch, length, dim, groups = shape
  args = _inputs(rng, batch, length, dim, groups, dtype, mean=mean, prior=prior)
  y, mu_run, rstd_run, mean_f, var_f = tm.timestep_norm_fwd_mgpu(*args, num_groups=groups, eps=_EPS,
                                                                 interpret=params, **config)
  assert not gpu_callbacks.get_races().races_found
  assert y.shape == (batch, length, dim) and y.dtype == dtype
  assert mu_run.shape == rstd_run.shape == (batch, groups, length)
  want_y, want_mu, want_rstd, want_mean, want_var = welford_float64(*args, groups, _EPS)
  # Statistics: float32 merges of float32 tile sums. mu within a few ulp of its magnitude (plus
  # 1e-6 of the spread). rstd and var: relative 2e-6 at mean 0; at a mean of 100 the float32 step
  # means themselves (sums of 64 values near 100) are off by ~1e-5 of the spread, which moves the
  # variance by a few 1e-6 (ops.timestep_norm's float32 paths: 1e-6 to 2e-5 on these inputs), so
  # 1e-5 there. An unshifted float32 sum of squares would be off by ~eps32 * mean^2 / var ~ 1e-3
  # relative at a mean of 100: the in-tile shift is what passes here.
  var_rtol = 2e-6 * (1.0 + abs(mean) / 25.0)
  np.testing.assert_allclose(np.asarray(mu_run), want_mu, rtol=5e-7, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rstd_run), want_rstd, rtol=var_rtol)
  np.testing.assert_allclose(np.asarray(mean_f), want_mean, rtol=5e-7, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var_f), want_var, rtol=var_rtol)
  np.testing.assert_array_equal(np.asarray(mean_f), np.asarray(mu_run[:, :, -1]))
  # y: rounding to the output dtype (half an ulp: 2^-9 relative for bf16, 2^-12 for float16) on top
  # of the statistics' float32 errors.
  half_ulp = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
  err = np.abs(np.asarray(y, np.float64) - want_y)
  assert np.all(err <= 1.01 * half_ulp * np.abs(want_y) + 1e-4), float(np.max(err))


@pytest.mark.parametrize("spikes,var_rtol,mu_tol", [
    # Outlier steps at the start of later tiles (the 3rd and 4th of 4; two warpgroups): the shift is
    # a running mean from a tile earlier, and the result is as accurate as without outliers.
    (((256, 1000.0), (384, -3000.0)), 2e-6, 1e-6),
    # An outlier at t = 0 with no prior state, the worst case of a first tile's shift (its first
    # step): M2 loses up to log2(129) = 7 bits, ~1e-5 relative, and the carry keeps that error.
    (((0, 1000.0),), 3e-5, 5e-6),
])
def test_outlier_steps(rng, _interpreter, spikes, var_rtol, mu_tol):
  params, gpu_callbacks = _interpreter
  batch, length, dim, groups = 1, 512, 64, 1
  x = rng.standard_normal((batch, length, dim))
  for step, size in spikes:
    x[:, step] += size
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  args = (jnp.asarray(x, jnp.float16), f32(np.ones(dim)), f32(np.zeros(dim)), f32(np.zeros(batch)),
          f32(np.zeros((batch, groups))), f32(np.zeros((batch, groups))))
  y, mu_run, rstd_run, mean_f, var_f = tm.timestep_norm_fwd_mgpu(*args, num_groups=groups, eps=_EPS,
                                                                 block_t=128, stages=2, interpret=params)
  assert not gpu_callbacks.get_races().races_found
  want_y, want_mu, want_rstd, want_mean, want_var = welford_float64(*args, groups, _EPS)
  # mu: relative to the spread (sqrt(var + eps) = 1 / rstd, >= 40 once an outlier is in).
  assert np.max(np.abs(np.asarray(mu_run) - want_mu) * want_rstd) < mu_tol
  np.testing.assert_allclose(np.asarray(rstd_run), want_rstd, rtol=var_rtol / 2)
  np.testing.assert_allclose(np.asarray(var_f), want_var, rtol=var_rtol)
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=2.0 ** -10, atol=1e-3)


def test_split3_is_exact(rng):
  a = np.concatenate([rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
                      [0.0, 1.0, -3.0, 1e-30, 3e38, np.pi]]).astype(np.float32)
  hi, mid, lo = (np.asarray(p) for p in tm._split3(jnp.asarray(a)))
  for piece in (hi, mid, lo):  # each piece survives bf16 unchanged
    np.testing.assert_array_equal(piece.astype(jnp.bfloat16).astype(np.float32), piece)
  np.testing.assert_array_equal((hi.astype(np.float64) + mid + lo).astype(np.float32), a)


def test_reciprocal_is_accurate():
  n = np.concatenate([np.arange(1, 5000), np.arange(2 ** 24 - 5000, 2 ** 24)]).astype(np.float32)
  got = np.asarray(tm._reciprocal(jnp.asarray(n)), np.float64)
  np.testing.assert_allclose(got, 1.0 / n.astype(np.float64), rtol=2 ** -23)


@pytest.mark.parametrize("config", [
    dict(),  # the default: two warpgroups, 6 stages (the largest ring that fits), WGMMA layout, TMA
    dict(stages=4, y_store="direct"),  # ('wide' is refused outside the interpreter: wrong on the GPU)
    dict(block_t=64, stages=8, compute_wgs=1),
    dict(compute_wgs=3, stages=4),
    dict(block_t=64, compute_wgs=4, stages=6),
    dict(block_t=64, shape=(2, 4096, 4096, 32)),  # K = 128
])
def test_kernel_lowers_for_cuda(monkeypatch, config):
  """The benchmark shape (by default): one Mosaic GPU call with the right outputs, its shared memory
  within smem_bytes."""
  smem_requests, captured = capture_smem_requests(monkeypatch)
  config = dict(config)
  batch, length, dim, groups = config.pop("shape", (1, 32768, 4096, 64))
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  fn = lambda *a: tm.timestep_norm_fwd_mgpu(*a, num_groups=groups, eps=_EPS, **config)  # noqa: E731
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(
      jax.ShapeDtypeStruct((batch, length, dim), jnp.bfloat16), f32(dim), f32(dim), f32(batch),
      f32(batch, groups), f32(batch, groups))
  assert exported.mlir_module().count(f"custom_call @{tm.MOSAIC_GPU_CALL}(") == 1
  y, mu_run, rstd_run, mean_f, var_f = exported.out_avals
  assert (y.shape, y.dtype) == ((batch, length, dim), jnp.bfloat16)
  assert mu_run.shape == rstd_run.shape == (batch, groups, length) and mu_run.dtype == jnp.float32
  assert mean_f.shape == var_f.shape == (batch, groups)
  assert len(smem_requests) == captured  # one kernel launch (when the module could be seen)
  need = tm.smem_bytes(config.get("block_t", 128), dim // groups, config.get("stages", 6),
                       config.get("compute_wgs", 2))
  for request in smem_requests:
    assert int(request) <= need <= tm._SMEM_LIMIT


@pytest.mark.parametrize("change,message", [
    (dict(padding_mask=True), "padding masks and segment ids"),
    (dict(segment_ids=True), "padding masks and segment ids"),
    (dict(dim=96, groups=3), "K = 32 is not a multiple of 64"),
    (dict(dim=200, groups=3), "divisible by num_groups"),
    (dict(length=320), "not a multiple of block_t=128"),
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(block_t=32), "block_t must be one of"),
    (dict(dim=256, groups=1), "block_t \\* K = 32768 > 8192"),
    (dict(stages=7), "KiB of shared memory"),
    (dict(compute_wgs=5), "compute_wgs must be in"),
    (dict(tile_layout="strided"), "tile_layout must be one of"),
    (dict(y_store="atomic"), "y_store must be one of"),
    (dict(tile_layout="wide"), "gives wrong results on the GPU"),
])
def test_unsupported_inputs_raise(change, message):
  dim, groups, length = change.get("dim", 128), change.get("groups", 2), change.get("length", 256)
  shape, dtype = (1, length, dim), change.get("dtype", jnp.bfloat16)
  options = {key: change[key] for key in ("block_t", "stages", "compute_wgs", "tile_layout", "y_store")
             if key in change}
  x = jax.ShapeDtypeStruct(shape, dtype)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  if "padding_mask" in change or "segment_ids" in change:
    with pytest.raises(ValueError, match=message):
      tm._check(shape, dtype, groups, 128, 6, 2, padding_mask=change.get("padding_mask"),
                segment_ids=change.get("segment_ids"))
    assert not tm.supported(shape, dtype, groups, padding_mask=change.get("padding_mask"),
                            segment_ids=change.get("segment_ids"))
    return
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda *a: tm.timestep_norm_fwd_mgpu(*a, num_groups=groups, eps=_EPS, **options),
                   x, f32(dim), f32(dim), f32(1), f32(1, groups), f32(1, groups))
  if not {"tile_layout", "y_store"} & options.keys():
    assert not tm.supported(shape, dtype, groups, **options)


def test_supported_at_the_benchmark_shape():
  assert tm.supported((1, 32768, 4096), jnp.bfloat16, 64)
  assert tm.supported((4, 2048, 1024), jnp.float16, 16, block_t=64, stages=8, compute_wgs=1)
