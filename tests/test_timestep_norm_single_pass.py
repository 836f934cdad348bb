"""kernels_pallas/timestep_norm_single_pass.py on the CPU: the Mosaic GPU forward and backward joined by their
custom VJP, run under Mosaic GPU's interpreter, against megalodon_jax.ops.timestep_norm (values, the returned
state, and gradients in x, weight, bias and the incoming state); and the dispatch switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import timestep_norm as tsn_kernel
from kernels_pallas import timestep_norm_single_pass as single
from megalodon_jax.ops import timestep_norm as tsn_ops

_EPS = 1e-5


@pytest.fixture
def _interpreter(monkeypatch):
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


def _problem(batch=1, length=512, dim=128, groups=2, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(3), 7)
  x = (0.5 + jax.random.normal(keys[0], (batch, length, dim)) * (0.5 + jax.random.uniform(keys[1], (dim,))))
  weight = 0.1 * jax.random.normal(keys[2], (dim,))
  bias = 0.1 * jax.random.normal(keys[3], (dim,))
  state = tsn_ops.TimestepNormState(jnp.full((batch,), 7, jnp.int32),
                                    0.5 + 0.1 * jax.random.normal(keys[4], (batch, groups)),
                                    1.0 + 0.2 * jax.random.uniform(keys[5], (batch, groups)))
  dy = jax.random.normal(keys[6], (batch, length, dim))
  return x.astype(dtype), weight, bias, state, dy.astype(dtype)


def _loss(fn, dy):
  def loss(x, weight, bias, mean, var, count):
    y, st = fn(x, weight, bias, tsn_ops.TimestepNormState(count, mean, var))
    # The final state's mean and var enter the loss too, so their cotangents reach the backward.
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)) + jnp.sum(st.mean * 0.3) + jnp.sum(st.var * 0.7)
  return loss


@pytest.mark.parametrize("splits", [1, 2])
def test_single_pass_matches_the_sequential_op_in_the_interpreter(_interpreter, splits):
  # splits=2: both halves of the sequence run at once, joined by the step sums' state and adjoint at the half.
  params, gpu_callbacks = _interpreter
  groups = 2
  x, weight, bias, state, dy = _problem(groups=groups, dtype=jnp.bfloat16)  # the kernels take 16-bit x

  def kernel(x, weight, bias, st):
    return single.timestep_norm_single_pass(x, weight, bias, st, num_groups=groups, eps=_EPS, interpret=params,
                                            splits=splits)

  def reference(x, weight, bias, st):
    return tsn_ops.timestep_norm(x, weight, bias, num_groups=groups, eps=_EPS, state=st, method="sequential")

  y, st = kernel(x, weight, bias, state)
  want_y, want_st = reference(x, weight, bias, state)
  assert not gpu_callbacks.get_races().races_found
  # y (bfloat16 in both): the float32 statistics differ in their last bits, so y may round to the
  # neighbouring bfloat16 value (2^-8 relative).
  y32, want32 = np.asarray(y, np.float32), np.asarray(want_y, np.float32)
  assert np.max(np.abs(y32 - want32)) <= 2.0 ** -8 * np.max(np.abs(want32))
  np.testing.assert_array_equal(np.asarray(st.count), np.asarray(want_st.count))
  np.testing.assert_allclose(np.asarray(st.mean), np.asarray(want_st.mean), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(st.var), np.asarray(want_st.var), rtol=1e-5)
  args = (x, weight, bias, state.mean, state.var, state.count)
  got = jax.grad(_loss(kernel, dy), argnums=(0, 1, 2, 3, 4))(*args)
  want = jax.grad(_loss(reference, dy), argnums=(0, 1, 2, 3, 4))(*args)
  # dx is bfloat16 (the neighbouring value at worst, 2^-8); the parameter and state gradients are float32
  # sums taken in other orders (tiles, warpgroups) than the sequential scan's.
  for name, g, w, tol in zip(("dx", "dweight", "dbias", "dmean0", "dvar0"), got, want,
                             (2.0 ** -8, 1e-4, 1e-4, 1e-4, 1e-4)):
    w32 = np.asarray(w, np.float32)
    assert np.max(np.abs(np.asarray(g, np.float32) - w32)) <= tol * np.max(np.abs(w32)), name


def _float64_running_stats(x, state, groups):
  """numpy float64 running (mu [B, G, L], rstd [B, G, L]) and the state after every step, by Welford steps."""
  xg = np.asarray(x, np.float64).reshape(*x.shape[:2], groups, -1)
  m, v = xg.mean(-1), xg.var(-1)
  n = np.asarray(state.count, np.float64)
  mu, var = np.asarray(state.mean, np.float64).copy(), np.asarray(state.var, np.float64).copy()
  mus, rstds = [], []
  for t in range(x.shape[1]):
    n1 = n + 1
    delta = m[:, t] - mu
    mu = mu + delta / n1[:, None]
    var = (n[:, None] * var + v[:, t]) / n1[:, None] + delta ** 2 * (n / n1 ** 2)[:, None]
    n = n1
    mus.append(mu)
    rstds.append(1.0 / np.sqrt(var + _EPS))
  return np.stack(mus, -1), np.stack(rstds, -1)


def test_state_after_the_first_half_matches_float64_welford():
  groups = 2
  x, _, _, state, _ = _problem(groups=groups, dtype=jnp.bfloat16)
  half = x.shape[1] // 2
  n0 = jnp.asarray(state.count, jnp.float32)
  count, mean, var = single._state_after_first_half(x, n0, state.mean, state.var, groups, True)
  mu64, rstd64 = _float64_running_stats(x[:, :half], state, groups)
  np.testing.assert_array_equal(np.asarray(count), np.asarray(state.count) + half)
  np.testing.assert_allclose(np.asarray(mean), mu64[..., -1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var), rstd64[..., -1] ** -2 - _EPS, rtol=1e-5)


def test_adjoint_at_the_half_is_the_gradient_of_the_second_half_in_its_starting_state():
  # The closed form's (d mean, d var) of the state the second half starts from, against autodiff of the float32
  # sequential op run on the second half alone from that state.
  groups = 2
  x, weight, bias, state, dy = _problem(groups=groups)
  half = x.shape[1] // 2
  n0 = jnp.asarray(state.count, jnp.float32)
  n_mid, mu_mid, var_mid = single._state_after_first_half(x, n0, state.mean, state.var, groups, True)
  g_mu, g_var = 0.3 * jnp.ones_like(mu_mid), 0.7 * jnp.ones_like(mu_mid)
  mid = tsn_ops.TimestepNormState(jnp.asarray(n_mid, jnp.int32), mu_mid, var_mid)

  def loss(mean, var):
    y, st = tsn_ops.timestep_norm(x[:, half:], weight, bias, num_groups=groups, eps=_EPS,
                                  state=tsn_ops.TimestepNormState(mid.count, mean, var), method="sequential")
    return jnp.sum(y * dy[:, half:]) + jnp.sum(st.mean * g_mu) + jnp.sum(st.var * g_var)

  want = jax.grad(loss, argnums=(0, 1))(mu_mid, var_mid)
  mu_run, rstd_run = _float64_running_stats(x[:, half:], mid, groups)
  # The [2B, G, L / 2] layout of the split kernels: the second half at odd rows (the first half's rows unused).
  as_split = lambda a: single._stack_halves(jnp.full(a.shape, np.nan, jnp.float32), jnp.asarray(a, jnp.float32))  # noqa: E731
  got = single._adjoint_at_half(x, dy, weight + 1.0, as_split(mu_run), as_split(rstd_run), n_mid, mu_mid, g_mu,
                                g_var, groups, True)
  for name, g, w in zip(("d mean", "d var"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-4 * np.max(np.abs(w)), err_msg=name)


def test_time_splits_choice(monkeypatch):
  monkeypatch.delenv(single.SPLITS_ENV, raising=False)
  monkeypatch.setattr(single, "_sm_count", lambda: 132)
  assert single.time_splits(1, 32768, 4096, 64) == 2          # 64 programs -> 128 on 132 SMs
  assert single.time_splits(4, 32768, 4096, 64) == 1          # 512 programs already fill the GPU
  assert single.time_splits(1, 32768 + 64, 4096, 64) == 1     # the halves would not hold whole tiles
  assert single.time_splits(1, 32768, 64 * 192, 64) == 1      # K = 192: the step sums need a power of 2
  monkeypatch.setattr(single, "_sm_count", lambda: 100)
  assert single.time_splits(1, 32768, 4096, 64) == 1          # 128 programs would take two waves
  monkeypatch.setenv(single.SPLITS_ENV, "1")
  assert single.time_splits(1, 32768, 4096, 64) == 1
  monkeypatch.setenv(single.SPLITS_ENV, "2")
  assert single.time_splits(4, 32768, 4096, 64) == 2
  with pytest.raises(ValueError, match="multiple of"):
    single.time_splits(1, 32768 + 64, 4096, 64)
  monkeypatch.setenv(single.SPLITS_ENV, "3")
  with pytest.raises(ValueError, match="use 1, 2"):
    single.time_splits(1, 32768, 4096, 64)


def test_switch_values(monkeypatch):
  for value, expected in (("", "auto"), ("0", "off"), ("1", "force")):
    monkeypatch.setenv(single.ENV, value)
    assert single.mode() == expected
  monkeypatch.setenv(single.ENV, "yes")
  with pytest.raises(ValueError, match="MEGALODON_TSN_SINGLE_PASS='yes'"):
    single.mode()


def test_not_taken_without_a_hopper_gpu_and_forcing_it_says_why(host_without_hopper, monkeypatch):
  x, weight, bias, state, _ = _problem()
  assert "Hopper" in single.why_not(x.shape, x.dtype, 2, None, None)  # this CPU
  monkeypatch.setenv(single.ENV, "1")
  with pytest.raises(ValueError, match="cannot take this call: needs a compute-capability 9.x"):
    tsn_kernel._single_pass_or_none(x, weight, bias, 2, _EPS, state, None, None)
  monkeypatch.setenv(single.ENV, "0")
  assert tsn_kernel._single_pass_or_none(x, weight, bias, 2, _EPS, state, None, None) is None


def test_unsupported_calls_fall_back(monkeypatch):
  monkeypatch.setattr(single, "_on_hopper", lambda: True)
  shape = (1, 32768, 4096)
  assert single.why_not(shape, jnp.bfloat16, 64, None, None) is None  # the benchmark shape is taken
  assert "segment ids" in single.why_not(shape, jnp.bfloat16, 64, None, jnp.zeros(shape[:2], jnp.int32))
  assert single.why_not((1, 32768, 4096), jnp.bfloat16, 128, None, None) is not None  # 32 features per group
  assert single.why_not((1, 1000, 4096), jnp.bfloat16, 64, None, None) is not None  # L not a multiple of the tiles


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2])
def test_single_pass_matches_the_sequential_op_on_hopper(splits):
  """Compiled on the GPU (run with MEGALODON_TEST_PLATFORM=gpu -m gpu on an H100 / H200): the single pass, whole
  and in two halves at once, against the float32 sequential op (values, state, gradients)."""
  if not single._on_hopper():
    pytest.fail("needs a compute-capability 9.x GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  groups = 8
  x, weight, bias, state, dy = _problem(batch=2, length=2048, dim=512, groups=groups, dtype=jnp.bfloat16)

  def kernel(x, weight, bias, st):
    return single.timestep_norm_single_pass(x, weight, bias, st, num_groups=groups, eps=_EPS, splits=splits)

  def reference(x, weight, bias, st):
    return tsn_ops.timestep_norm(x.astype(jnp.float32), weight, bias, num_groups=groups, eps=_EPS, state=st,
                                 method="sequential")

  y, st = jax.jit(kernel)(x, weight, bias, state)
  want_y, want_st = jax.jit(reference)(x, weight, bias, state)
  y32, want32 = np.asarray(y, np.float32), np.asarray(want_y, np.float32)
  assert np.max(np.abs(y32 - want32)) <= 2.0 ** -8 * np.max(np.abs(want32))
  np.testing.assert_allclose(np.asarray(st.mean), np.asarray(want_st.mean), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(st.var), np.asarray(want_st.var), rtol=1e-4)
  args = (x, weight, bias, state.mean, state.var, state.count)
  got = jax.jit(jax.grad(_loss(kernel, dy), argnums=(0, 1, 2, 3, 4)))(*args)
  want = jax.jit(jax.grad(_loss(reference, dy), argnums=(0, 1, 2, 3, 4)))(*args)
  for name, g, w, tol in zip(("dx", "dweight", "dbias", "dmean0", "dvar0"), got, want,
                             (2.0 ** -7, 1e-3, 1e-3, 1e-3, 1e-3)):
    w32 = np.asarray(w, np.float32)
    assert np.max(np.abs(np.asarray(g, np.float32) - w32)) <= tol * np.max(np.abs(w32)), name
